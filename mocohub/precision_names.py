"""The precision names, apart from their torch dtypes (precision.py), so a parser can list them without torch."""
__all__ = ["PRECISION_NAMES", "PRECISION_CHOICES"]

PRECISION_NAMES = ("fp32", "bf16", "fp16")
PRECISION_CHOICES = ("auto", *PRECISION_NAMES)
