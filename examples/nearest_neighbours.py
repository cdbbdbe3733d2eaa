"""Embed a folder of images with a MoCo backbone, then list each query's nearest neighbours.

    python examples/nearest_neighbours.py --model moco-r50 --images photos/ --out photos.safetensors --k 5

Embeddings are L2-normalised, so the dot product is the cosine similarity. Re-running resumes
an interrupted extraction.
"""
from __future__ import annotations

import argparse

import mocohub
from mocohub.evaluation.extract import extract_embeddings, load_embeddings


def main(argv=None) -> dict[str, list[tuple[str, float]]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="moco-r50", help="anything mocohub.from_pretrained accepts")
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="embeddings file (safetensors)")
    p.add_argument("--queries", nargs="*", help="paths relative to --images (default: the first 3 images)")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)

    model = mocohub.from_pretrained(args.model)
    extract_embeddings(model, args.images, args.out, batch_size=args.batch_size, workers=args.workers,
                       resume=True, progress=True, model_name=args.model)
    emb = load_embeddings(args.out)
    queries = args.queries or emb.paths[:3]
    results = {}
    for query in queries:
        sims = emb.features @ emb.features[emb.paths.index(query)]
        sims[emb.paths.index(query)] = -2.0  # not its own neighbour
        top = sims.topk(min(args.k, len(sims) - 1))
        results[query] = [(emb.paths[i], round(s, 4)) for s, i in zip(top.values.tolist(), top.indices.tolist())]
        print(query, "->", ", ".join(f"{path} ({sim:.3f})" for path, sim in results[query]))
    return results


if __name__ == "__main__":
    main()
