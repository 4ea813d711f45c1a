"""The image's guard: fail the build when the installed torch is not the variant's build.

`python check_torch.py cpu` fails if torch is a CUDA build (a "+cpu" local version and no
nvidia-* requirements expected), `python check_torch.py cuda` if it is not. It reads the
installed distribution's metadata, so it works right after `pip install --no-deps torch`, before
torch's own dependencies are installed; once torch imports, it also asks torch itself.
"""

from __future__ import annotations

import sys
from importlib import metadata


def check(variant: str) -> str | None:
    """None when the installed torch matches `variant`, else what is wrong."""
    try:
        dist = metadata.distribution("torch")
    except metadata.PackageNotFoundError:
        return "torch is not installed"
    version = dist.version
    nvidia = sorted(r.split(";")[0].strip() for r in dist.requires or [] if r.startswith("nvidia-"))
    cuda_build = "+cu" in version or bool(nvidia)
    if variant == "cpu" and (cuda_build or not version.endswith("+cpu")):
        return (
            f"the CPU image got torch {version}, a CUDA build"
            + (f" requiring {', '.join(nvidia[:3])}..." if nvidia else "")
            + ": the CPU index (TORCH_INDEX_URL) was not used; refusing to build a multi-GB "
            "'CPU' image"
        )
    if variant == "cuda" and not cuda_build:
        return f"the CUDA image got torch {version}, not a CUDA build"
    try:
        import torch
    except ImportError:  # its dependencies come later: the metadata had to do
        return None
    if (torch.version.cuda is None) != (variant == "cpu"):
        return (
            f"torch {torch.__version__} reports CUDA {torch.version.cuda!r} in the {variant} image"
        )
    return None


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("cpu", "cuda"):
        print("usage: check_torch.py cpu|cuda", file=sys.stderr)
        return 2
    problem = check(argv[0])
    if problem is not None:
        print(f"check_torch: {problem}", file=sys.stderr)
        return 1
    print(f"check_torch: torch {metadata.version('torch')} is a {argv[0]} build")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
