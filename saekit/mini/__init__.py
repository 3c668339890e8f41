"""The mini world: everything the `mini` profile builds or ships so that the book runs on a CPU.

- `toyworld`: the planted-hierarchy image world, its shifts and masks, and the toy ViT trained on it;
- `miniatures`: the supported encoder architectures at toy size, saved as hub checkpoints;
- `diffusion`: miniature Stable Diffusion 1.x / 3 pipelines and the mini prompt corpus;
- `llava`: a miniature LLaVA-1.5 with an offline tokenizer and processor;
- `toy_judge`, `toy_t2i`, `toy_llava`: the toy CLIPs, text-to-image model and LLaVA trained on the
  toy world (shipped in `assets`), with `training`, the loop and records all toy trainers share;
- `hub`: the paper profile's checkpoints as hub-shaped miniatures in a Hugging Face cache
  (real architecture classes and depths, tiny widths) and ImageNet-layout folders of the toy
  world, so that ``make rehearse`` runs every chapter's paper path offline on a CPU.

The mini world imports only the core (`saekit.data`, `saekit.models`, `saekit.masks`, ...).
"""
