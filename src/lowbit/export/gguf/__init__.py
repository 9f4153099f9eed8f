"""GGUF export for llama.cpp, Ollama and LM Studio: lowbit's own codes and fp16 scales in GGUF blocks, exactly.

`checks` (before calibration and at export), `arch` (names, hyper-parameters), `families` (per-family facts),
`vocab` (tokenizer metadata; SentencePiece in `vocab_spm`, reading `tokenizer.model` with `spm_proto`), `mixes`
(llama.cpp's per-linear types), `blocks` / `kblocks` (packing), `tensors` (the file's tensor plan), `writer` (the
file), `verify` (read back), `streamed` (the file written as a streamed run's blocks finish).
"""

from lowbit.export.gguf.checks import GGUF_FORMAT, check_gguf_scheme, preflight_gguf
from lowbit.export.gguf.writer import PreparedGguf, prepare_gguf

__all__ = ["GGUF_FORMAT", "PreparedGguf", "check_gguf_scheme", "preflight_gguf", "prepare_gguf"]
