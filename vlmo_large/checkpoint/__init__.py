"""Checkpoint conversion and layout-changing resume.

- `to_plain`: DeepSpeed checkpoint (TP x DP x ZeRO-1/2/3, or pipeline TP x PP x DP x ZeRO-0/1; fp32
  or bf16) -> plain safetensors folder.
- `write_sharded` / `load_sharded_plain`: plain weights split for a TP x PP run, and the loader of
  a run's `--init`.
- `import_reference`, `import_beit`: released VLMo / BEiT weights -> plain folder; `export_reference`:
  a plain folder -> the reference's torch file.
- `save_portable` / `load_portable`: weights + Adam moments without a layout, to resume a run on
  another TP / DP / ZeRO layout.
"""
from vlmo_large.checkpoint.convert import export_reference, import_beit, import_reference, to_plain
from vlmo_large.checkpoint.plain import PlainCheckpoint
from vlmo_large.checkpoint.portable import load_portable, save_portable
from vlmo_large.checkpoint.sharded import load_sharded_plain, write_sharded

__all__ = ["to_plain", "write_sharded", "load_sharded_plain", "import_reference", "export_reference",
           "import_beit", "PlainCheckpoint", "save_portable", "load_portable"]
