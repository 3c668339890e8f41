"""The train and sweep subcommands: TOML parsing and end-to-end runs on an in-memory store."""

import json

import numpy as np
import pytest
import torch

from saekit.sae import commands, load_sae, load_sweep

SWEEP_TOML = """
store = "unused-by-the-fake"
out = "{out}"
recipe = "olson2025"
epochs = 1
batch_size = 40

[recipe_overrides]
lr = 1e-3

[grid]
layer = [1, 4]
arch = ["relu", "topk"]
expansion = [2]
l1 = [0.5, 10.0]
k = [3]

[[sae]]
layer = 4
arch = "gated"
l1 = 5.0
expansion = 2
"""


class TinyStore:
    def __init__(self):
        rng = np.random.default_rng(0)
        self._cls = {layer: rng.normal(size=(120, 8)).astype(np.float32) for layer in (1, 4)}
        self.manifest = {"model": "tiny", "layers": [1, 4], "d_model": 8, "n_rows": 120}

    def cls(self, layer):
        return self._cls[layer]

    def batches(self, layer, batch_size, *, tokens="cls", seed=0, epoch=0):
        perm = np.random.default_rng([seed, epoch]).permutation(120)
        layers = layer if isinstance(layer, list) else [layer]
        for i in range(0, 120, batch_size):
            rows = {ly: torch.from_numpy(self._cls[ly][perm[i : i + batch_size]]) for ly in layers}
            yield rows if isinstance(layer, list) else rows[layer]


def _parser():
    """The real ``saekit`` parser: the lead's cli.py, which calls ``commands.register``."""
    from saekit.cli import build_parser

    return build_parser()


def test_sweep_file_expands_the_grid(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out"))
    cfg = commands.load_sweep_config(path)
    # 2 layers × (2 λ for relu + 1 k for topk) + 1 explicit gated
    assert len(cfg.specs) == 7
    labels = sorted(s.label for s in cfg.specs)
    assert "layer01-relu-x2-l1_0.5-olson2025" in labels
    assert "layer04-topk-x2-k3-olson2025" in labels
    assert "layer04-gated-x2-l1_5-olson2025" in labels
    assert all(s.recipe.lr == 1e-3 for s in cfg.specs)
    assert (cfg.epochs, cfg.batch_size) == (1, 40)


def test_sweep_file_errors_name_the_bad_key(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('store = "s"\nout = "o"\n[grid]\nlayers = [1]\n')
    with pytest.raises(ValueError, match="unknown keys \\['layers'\\]"):
        commands.load_sweep_config(path)
    path.write_text('out = "o"\n[grid]\nlayer = [1]\n')
    with pytest.raises(ValueError, match="missing `store"):
        commands.load_sweep_config(path)


def test_saekit_sweep_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out"))
    args = _parser().parse_args(["sweep", str(path)])
    assert args.handler(args) == 0
    saes = load_sweep(tmp_path / "out")
    assert len(saes) == 7
    assert (
        json.loads((tmp_path / "out" / "sweep.json").read_text())["saes"][0]["spec"]["layer"] == 1
    )
    topk = saes["layer04-topk-x2-k3-olson2025"]
    codes = topk.encode(torch.from_numpy(TinyStore().cls(4)))
    assert ((codes != 0).sum(-1) <= 3).all() and topk.cfg.d_in == 8


def test_saekit_train_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    out = tmp_path / "sae"
    argv = [
        "train",
        "--store",
        "x",
        "--layer",
        "4",
        "--arch",
        "topk",
        "--k",
        "2",
        "--expansion",
        "2",
    ]
    argv += ["--recipe", "stevens2025", "--batch-size", "30", "--epochs", "2", "--out", str(out)]
    args = _parser().parse_args(argv)
    assert args.handler(args) == 0
    sae = load_sae(out)
    assert type(sae).__name__ == "TopKSAE" and sae.cfg.d_sae == 16 and sae.cfg.k == 2
    info = sae.cfg.metadata.saekit
    assert info["input_normalization"]["folded"] and info["steps"] == 8
    assert not (out / ".checkpoint" / "checkpoint.safetensors").exists()


# --- the command line: errors, help, speed ---------------------------------------------------------


def _main(argv, capsys):
    from saekit.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _train_argv(out, *extra):
    return ["train", "--store", "x", "--layer", "4", "--expansion", "2", "--epochs", "1",
            "--batch-size", "30", "--out", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--arch", "relu", "--k", "8"], "--k applies to topk, batchtopk and matryoshka"),
        (["--arch", "standard", "--k", "8"], "a relu SAE's sparsity is --l1"),
        (["--arch", "topk", "--l1", "3"], "--l1 applies to relu, gated and jumprelu"),
        (["--arch", "batchtopk", "--l1", "3"], "a batchtopk SAE's sparsity is --k"),
    ],
)
def test_flags_that_do_not_apply_to_the_architecture_are_errors(flags, message, tmp_path, capsys):
    """The reported bug: --arch relu --k 8 trained with λ, --arch topk --l1 3 with k = 32."""
    code, _, err = _main(_train_argv(tmp_path / "sae", *flags), capsys)
    assert code == 2 and message in err and "Traceback" not in err and "--debug" in err
    assert not (tmp_path / "sae").exists()


def test_errors_print_one_message_and_debug_shows_the_traceback(tmp_path, capsys):
    argv = _train_argv(tmp_path / "sae")
    argv[2] = str(tmp_path / "no-store")
    code, _, err = _main(argv, capsys)
    assert code == 1 and "No activation store at" in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="No activation store"):
        _main([*argv, "--debug"], capsys)
    with pytest.raises(FileNotFoundError):
        _main(["--debug", *argv], capsys)


def test_an_interrupt_says_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(path):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "_open_store", interrupted)
    code, _, err = _main(_train_argv(tmp_path / "sae"), capsys)
    assert code == 130 and "Run the same command again to resume" in err


@pytest.mark.parametrize("layers", ["", "1-x", "1,,2", "5-3"])
def test_bad_layers_are_refused_before_any_folder_exists(layers, tmp_path, capsys):
    from saekit.cli import main

    argv = [
        "extract",
        "--model",
        "m",
        "--data",
        "d",
        "--layers",
        layers,
        "--out",
        str(tmp_path / "s"),
    ]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "argument --layers" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_train_refuses_other_settings_unless_overwrite_and_skips_a_finished_run(
    tmp_path, capsys, monkeypatch
):
    """The reported bug: training into a folder holding other settings overwrote it."""
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    out = tmp_path / "sae"
    assert _main(_train_argv(out), capsys)[0] == 0
    weights = (out / "sae_weights.safetensors").read_bytes()
    code, stdout, _ = _main(_train_argv(out), capsys)
    assert code == 0 and "nothing to do" in stdout
    code, _, err = _main(_train_argv(out, "--data-seed", "1"), capsys)
    assert code == 1 and "data_seed: 0 there, 1 now" in err and "--overwrite" in err
    assert (out / "sae_weights.safetensors").read_bytes() == weights
    code, stdout, _ = _main(_train_argv(out, "--data-seed", "1", "--overwrite"), capsys)
    assert code == 0 and "saved" in stdout
    assert (out / "sae_weights.safetensors").read_bytes() != weights


def test_sweep_refuses_a_folder_of_another_sweep_unless_overwrite(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(commands, "_open_store", lambda path: TinyStore())
    path = tmp_path / "sweep.toml"
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out"))
    assert _main(["sweep", str(path)], capsys)[0] == 0
    code, stdout, _ = _main(["sweep", str(path)], capsys)
    assert code == 0 and "nothing to do" in stdout
    path.write_text(SWEEP_TOML.format(out=tmp_path / "out").replace("lr = 1e-3", "lr = 2e-3"))
    code, _, err = _main(["sweep", str(path)], capsys)
    assert code == 1 and "the SAEs" in err and "--overwrite" in err
    assert _main(["sweep", str(path), "--overwrite"], capsys)[0] == 0
    assert load_sweep(tmp_path / "out")["layer01-relu-x2-l1_0.5-olson2025"].cfg.d_sae == 16


def test_the_cli_mirrors_the_registries_it_lists_without_importing_them():
    from saekit.cli import ARCH_NAMES, K_ARCH_NAMES, RECIPE_NAMES
    from saekit.sae.architectures import ARCH_ALIASES, ARCHITECTURES, K_ARCHS
    from saekit.sae.recipes import RECIPES

    assert set(ARCH_NAMES) == set(ARCHITECTURES) | set(ARCH_ALIASES)
    assert set(K_ARCH_NAMES) == set(K_ARCHS) and set(RECIPE_NAMES) == set(RECIPES)


def test_help_imports_nothing_heavy():
    """`saekit -h` took 6-8 s: everything was imported first."""
    import subprocess
    import sys

    code = (
        "import sys; from saekit.cli import build_parser\n"
        "for command in ('help', 'extract', 'train', 'sweep'): build_parser(command)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'sae_lens') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"


def test_every_command_and_flag_has_help():
    from saekit.cli import build_parser

    parser = build_parser("help")
    commands_action = next(a for a in parser._actions if a.dest == "command")
    for name, sub in commands_action.choices.items():
        assert sub.description, name
        if name == "book":  # registered by saekit.runner; its flags are checked with it
            continue
        for action in sub._actions:
            assert action.help, (name, action.option_strings or action.dest)
    assert all(choice.help for choice in commands_action._choices_actions)
