"""Reading PyTorch pickles without running them.

`torch.load(weights_only=True)` refuses a pickle that names anything but tensors and plain
containers; what it refused is then read with `pickletools` (opcodes only, nothing imported or
run), so the user learns whether the file carries code (refused for safety, with how to convert a
file they trust) or is simply damaged. Every file diffprobe unpickles goes through here:
checkpoints, training states, Inception weights, diffusers/transformers `.bin` weights.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffprobeError

# What torch.save itself pickles for a dict of tensors; any other global is code or a Python class.
_TENSOR_GLOBALS = ("torch._utils.", "torch._tensor.", "collections.OrderedDict", "_codecs.encode")
_PLAIN_CONTAINERS = {f"{m}.{t}" for m in ("builtins", "__builtin__") for t in ("set", "frozenset", "bytearray", "slice", "complex")}


def _is_tensor_machinery(name: str) -> bool:
    if name in _PLAIN_CONTAINERS or name.startswith(_TENSOR_GLOBALS):
        return True
    return name.startswith("torch.") and name.count(".") == 1  # torch.FloatStorage, torch.Size


def pickled_code(path: str | Path) -> list[str]:
    """The functions and classes a checkpoint's pickle would import (read, never run).

    Reads the opcodes with pickletools, so nothing is executed. torch.save's zip holds the
    pickle as */data.pkl; an older or hand-made file is the pickle itself. [] when the pickle
    names nothing but tensor machinery, or cannot be parsed (then it is plain corrupt).
    """
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(name)
        else:
            data = Path(path).read_bytes()
        found, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(arg))
            elif op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # truncated or not a pickle: not ours to classify
        return []
    return sorted({g for g in found if not _is_tensor_machinery(g)})


def code_refusal(path: str | Path, code: list[str]) -> DiffprobeError:
    """The one-line refusal for a pickle that would import and run `code`."""
    return DiffprobeError(
        f"{path} contains Python objects or code ({', '.join(code[:3])}) that unpickling would import and run: refused for safety. If you "
        "trust its source, convert it once in a Python session: sd = torch.load(PATH, weights_only=False); "
        "torch.save(sd.state_dict() if hasattr(sd, 'state_dict') else sd, 'plain.pt') (or safetensors.torch.save_file)"
    )


def refuse_code(path: str | Path) -> None:
    """Refuse `path` (one line) if its pickle would run code; nothing is loaded. For files a library
    loads itself (transformers' and diffusers' `.bin`), checked before the library sees them."""
    path = Path(path)
    if path.is_file():
        code = pickled_code(path)
        if code:
            raise code_refusal(path, code)


def load_torch_file(path: str | Path, what: str, recover: str, **kwargs: Any) -> Any:
    """torch.load(path, weights_only=True) on the CPU; a pickle carrying code is refused, and a
    damaged or empty file is one line naming `what` it is and how to `recover`."""
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles on stderr; the error below says it all
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, **kwargs)
    except FileNotFoundError:
        raise DiffprobeError(f"{what} not found: {path}") from None
    except Exception as e:
        code = pickled_code(path)
        if code:
            raise code_refusal(path, code) from None
        size = Path(path).stat().st_size if Path(path).is_file() else 0
        state = "empty" if size == 0 else f"corrupt or not a PyTorch file, or cut short ({type(e).__name__})"
        raise DiffprobeError(f"cannot read {what} {path}: {state}; {recover}") from None
