"""A copy of a GGUF LLM with a new input-embedding table: used by the trainer (--train-token-embeddings)
and by the reference-checkpoint importer, whose checkpoints fine-tune that table."""
import contextlib
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np


def read_token_table(path):
    """token_embd.weight of a GGUF as float32 [vocab, d] (dequantized)."""
    from gguf.quants import dequantize

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    rows, dim = (int(x) for x in reversed(t.shape))
    return dequantize(t.data, t.tensor_type).reshape(rows, dim).astype(np.float32)


def write_gguf(base, out, table, embed_type="f16", what="the new table"):
    """Copies `base` (all metadata and tensors) to `out` atomically, with token_embd.weight
    replaced by `table` [vocab, d] stored as f16 or f32.

    The output layer stays the base model's, as in the reference (lm_head is frozen while the
    input table trains): where the base ties it to token_embd (Gemma), the base table is kept as
    an explicit output.weight, which llama.cpp prefers over the tie."""
    base, out = Path(base), Path(out)
    reader = gguf.GGUFReader(base)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    new = np.asarray(table).astype(np.float16 if embed_type == "f16" else np.float32)
    tensors, embd = [], None
    for t in reader.tensors:
        if t.name == "token_embd.weight":
            embd = t
            rows, dim = (int(x) for x in reversed(t.shape))  # GGUF dims are reversed
            if new.shape != (rows, dim):
                raise SystemExit(f"{what} is {list(new.shape)}, the base model's token_embd is {[rows, dim]}: "
                                 f"not the same LLM")
            kind = gguf.GGMLQuantizationType.F16 if embed_type == "f16" else gguf.GGMLQuantizationType.F32
            tensors.append((t.name, new, kind))
        else:
            tensors.append((t.name, t.data, t.tensor_type))
    if embd is None:
        raise SystemExit(f"{base} has no token_embd.weight")
    if not any(t.name == "output.weight" for t in reader.tensors):
        tensors.append(("output.weight", embd.data, embd.tensor_type))

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch=arch, endianess=reader.endianess)
        for field in reader.fields.values():
            if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
                continue  # written by GGUFWriter itself
            if field.name == gguf.Keys.General.ALIGNMENT:
                writer.add_custom_alignment(field.contents())  # the writer must pad to it too
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        for name, data, kind in tensors:
            writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for _, data, _ in tensors:
            writer.write_tensor_data(data)
        writer.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
