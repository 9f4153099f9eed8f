"""The names of the files and keys in an export directory, in one place."""

WEIGHTS_FILE = "model.safetensors"  # one file when the export fits a shard
INDEX_FILE = "model.safetensors.index.json"  # the weight map of a sharded export
RECORD_FILE = "lowbit_record.json"  # the run record: settings, versions, timings, metrics
ARTIFACTS_FILE = "lowbit_artifacts.safetensors"  # what the stages searched (AWQ scales, InvarExplore states, ...)
GGUF_FILE = "model.gguf"  # the one file of a GGUF export (llama.cpp, Ollama, LM Studio)
CARD_FILE = "README.md"  # the model card
LOWBIT_KEY = "lowbit"  # lowbit's own entry in config.json's quantization_config
