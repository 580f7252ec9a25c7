"""Hostile and broken model directories: each is one line on stderr and exit 2, nothing is
allocated past what the files justify, and nothing in a model file is ever run."""

import json
import pickle
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import run_cli, unprivileged

from llmcli.config import ModelConfig


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_model, d)
    return d


def refused(model, *, command=("translate",), input=b"seven\n"):
    """stderr of a command that must fail with one line, exit 2, no traceback and no output."""
    proc = run_cli(*command, "-m", str(model), "-q", input=input)
    err = proc.stderr.decode()
    assert proc.returncode == 2, (proc.returncode, err)
    assert proc.stdout == b"", proc.stdout
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("llmcli: error: "), err
    return err


def edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    assert "config.json" in refused(model_dir)


@pytest.mark.parametrize("change, named", [({"d_modle": 32}, "d_modle"), ({"d_model": "wide"}, "d_model"),
                                           ({"n_heads": 3}, "n_heads"), ({"norm": "batchnorm"}, "norm")])  # fmt: skip
def test_unknown_or_mistyped_config_fields(model_dir, change, named):
    edit_config(model_dir, **change)
    assert named in refused(model_dir)


def test_config_that_is_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    assert "config.json" in refused(model_dir)


def test_shapes_that_disagree_with_the_config(model_dir):
    edit_config(model_dir, d_ff=128)
    assert "shape" in refused(model_dir)


def test_a_tokenizer_with_more_tokens_than_the_model_has_embeddings(model_dir):
    from tokenizers import Tokenizer

    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tok.add_tokens([f"extra{i}" for i in range(vocab_size)])
    tok.save(str(model_dir / "tokenizer.json"))
    assert f"the model's output vocabulary is {vocab_size}" in refused(model_dir)


def test_tokenizer_that_is_not_json(model_dir):
    (model_dir / "tokenizer.json").write_text("<html>not a tokenizer</html>")
    assert "tokenizer.json" in refused(model_dir)


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_named_pytorch_model_bin_is_never_unpickled(tmp_path):
    """A Hugging Face directory whose only weights are a pickle that would run code."""
    d = tmp_path / "hf"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 1,
                                               "n_embd": 8, "n_head": 2, "vocab_size": 10, "n_positions": 8}))  # fmt: skip
    marker = tmp_path / "ran"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"wte.weight": Exploit(marker)}))
    refused(d, command=("generate", "--greedy", "hi"), input=None)
    assert not marker.exists()


def test_symlinked_file_escaping_the_model_directory(model_dir, tmp_path):
    outside = tmp_path / "elsewhere.json"
    shutil.move(model_dir / "tokenizer.json", outside)
    (model_dir / "tokenizer.json").symlink_to(outside)
    assert "outside" in refused(model_dir)


def test_a_model_directory_that_cannot_be_read(model_dir):
    model_dir.chmod(0)
    try:
        proc = subprocess.run([*unprivileged(), sys.executable, "-m", "llmcli", "translate", "-m", str(model_dir), "-q"],
                              input=b"seven\n", capture_output=True, timeout=120)  # fmt: skip
    finally:
        model_dir.chmod(0o755)
    err = proc.stderr.decode()
    assert proc.returncode == 2 and proc.stdout == b"", (proc.returncode, err)
    assert err.count("\n") == 1 and err.startswith(f"llmcli: error: {model_dir}") and "Permission denied" in err, err


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    refused(tmp_path)


def test_a_file_where_the_config_should_be_a_directory_entry(model_dir):
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors").mkdir()
    assert "model.safetensors" in refused(model_dir)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_safetensors_offsets_past_the_end_of_the_file(model_dir):
    def stretch(header):
        name = next(k for k in header if k != "__metadata__")
        start, end = header[name]["data_offsets"]
        header[name]["data_offsets"] = [start, end + 10**9]

    _rewrite_header(model_dir / "model.safetensors", stretch)
    assert "model.safetensors" in refused(model_dir)


def test_safetensors_header_length_past_the_end_of_the_file(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    assert "model.safetensors" in refused(model_dir)


def test_a_config_asking_for_a_trillion_parameters_is_refused_before_allocating(model_dir):
    edit_config(model_dir, d_model=65536, d_ff=262144, n_heads=64, n_encoder_layers=60, n_decoder_layers=60, vocab_size=2**20)
    assert ModelConfig.load(model_dir / "config.json").n_parameters > 10**12  # 4 TB in float32: allocating it fails
    assert "weights do not fit the config" in refused(model_dir)
