"""What only a GPU can show (skipped without one; benchmarks/gpu_check.sh runs them on a lent GPU):
the step agrees with the CPU's, every precision trains, the batched augmentation runs on the device."""
import pytest
import torch
import torch.nn.functional as F

from mocohub import MoCo
from mocohub.cli.main import main
from mocohub.data.synthetic import make_dataset
from mocohub.precision import resolve_precision

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_step_matches_the_cpu_step():
    torch.manual_seed(0)
    cpu = MoCo("resnet18", dim=16, K=64, m=0.9, T=0.2, stem="cifar").double()
    gpu = MoCo("resnet18", dim=16, K=64, m=0.9, T=0.2, stem="cifar").double().cuda()
    gpu.load_state_dict(cpu.state_dict())
    x_q, x_k = torch.randn(2, 8, 3, 16, 16, dtype=torch.float64)
    results = []
    for model, device in ((cpu, "cpu"), (gpu, "cuda")):
        logits, labels = model(x_q.to(device), x_k.to(device))
        F.cross_entropy(logits, labels).backward()
        results.append((logits.detach().cpu(), {n: p.grad.cpu() for n, p in model.encoder_q.named_parameters()}))
    # Each device draws its own Shuffle-BN permutation, but with one BN group keys do not depend on it.
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16", "auto"])
@pytest.mark.parametrize("aug", ["pil", "batched"])
def test_cuda_training_in_every_precision(tmp_path, precision, aug):
    train_dir, val_dir = make_dataset(tmp_path / "data", train_per_class=8, val_per_class=2, size=16)
    run = tmp_path / "run"
    assert main(["train", str(train_dir), "--recipe", "cifar", "--image-size", "16", "--batch-size", "16",
                 "--moco-k", "64", "--epochs", "2", "--workers", "2", "--no-progress", "--precision", precision,
                 "--aug-impl", aug, "--val", str(val_dir), "--out", str(run), "--device", "cuda"]) == 0
    state = torch.load(run / "checkpoint.pth.tar", weights_only=True)
    assert state["epoch"] == 2 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                       if v.is_floating_point())
    if precision == "auto":  # the rule written out: bf16 tensor cores from compute capability 8.0
        assert resolve_precision("auto", "cuda")[0] == ("bf16" if torch.cuda.get_device_capability() >= (8, 0)
                                                        else "fp16")
