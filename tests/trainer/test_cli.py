"""The original workflow end to end through the CLI: train small_cnn, embed, evaluation, test, cbir, export."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import tensorflow as tf

from trainer.cli import build_parser, main
from trainer.synthetic import TINY_OVERRIDES, make_image, write_original_dataset

CONFIG = "bags_resnet_v1_50_normalize_adam_angular_loss_alpha_45"
RUN = "bags_small_cnn_direct_normalize_adam_angular_loss_alpha_45"


def _args(data_dir, *extra):
    sets = [arg for item in TINY_OVERRIDES for arg in ("--set", item)]
    return ["-c", CONFIG, "--data-dir", str(data_dir), *sets, *extra]


@pytest.mark.slow
def test_original_workflow_end_to_end(tmp_path, capsys):
    data = tmp_path / "data"
    write_original_dataset(data)

    assert main(["train", *_args(data), "--no-progress"]) == 0
    run = data / "checkpoints" / RUN
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["name"] == "small_cnn" and saved["model"]["fit"]["alpha"] == 45
    assert tf.train.latest_checkpoint(str(run / "tf_ckpts")).endswith("ckpt-6")
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] in (3, 6)
    assert list((data / "logs" / RUN / "train").iterdir())  # TensorBoard event files

    # An existing run is never overwritten; --resume continues it.
    assert main(["train", *_args(data)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", *_args(data, "--set", "model.fit.epochs=7", "--resume", "--no-progress")]) == 0
    assert tf.train.latest_checkpoint(str(run / "tf_ckpts")).endswith("ckpt-7")
    assert main(["train", *_args(data, "--set", "model.fit.lr=0.5", "--resume")]) == 2
    assert "model.fit.lr" in capsys.readouterr().err

    assert main(["embed", *_args(data)]) == 0
    import h5py

    with h5py.File(data / "emb" / f"{RUN}.h5") as db:
        assert db["vectors"].shape == (16, 16) and len(db["paths"]) == 16 and len(db["ids"]) == 16
        np.testing.assert_array_equal(db["emb"][()], db["vectors"][()])

    capsys.readouterr()
    assert main(["evaluation", *_args(data, "-t", "20", "-r", "3")]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^MAP: \d+\.\d\d%$", out, re.M)
    assert "mAP@R" in out and "R@16" in out and "NMI" in out and "Score spread (cosine): top-" in out
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert evaluation["original_map"]["trials"] == 20
    assert evaluation["score_spread"]["random_pairs"]["different"]["count"] > 0

    figure = tmp_path / "test.png"
    assert main(["test", *_args(data, "-r", "5", "--seed", "3", "-o", str(figure))]) == 0
    out = capsys.readouterr().out
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert len(re.findall(r"^\s+\d+\s+\d+\.\d{4}\s+\S+\s+/", out, re.M)) == 5 and "AP@5" in out
    # The same seed picks the same query.
    assert main(["test", *_args(data, "-r", "5", "--seed", "3", "-o", str(figure))]) == 0
    assert capsys.readouterr().out.splitlines()[1] == out.splitlines()[1]

    query = tmp_path / "query.jpg"
    query.write_bytes(make_image(99, size=50, fmt="JPEG", label=2))
    assert main(["cbir", *_args(data, "-r", "3", "-o", str(tmp_path / "cbir.png"), str(query))]) == 0
    assert len(re.findall(r"^\s+[123]\s+\d+\.\d{4}\s", capsys.readouterr().out, re.M)) == 3
    not_image = tmp_path / "notes.txt"
    not_image.write_text("hello")
    assert main(["cbir", *_args(data, str(not_image))]) == 2
    assert "not a JPEG" in capsys.readouterr().err

    repo = tmp_path / "models"
    assert main(["export", *_args(data, "--model-repo", str(repo), "--model-name", "bags")]) == 0
    assert main(["export", *_args(data, "--model-repo", str(repo), "--model-name", "bags")]) == 0
    meta = json.loads((repo / "bags" / "2" / "assets.extra" / "cbir_model.json").read_text())
    assert meta["version"] == 2 and meta["evaluation"]["evaluation_command"]["original_map"]["r"] == 3
    loaded = tf.saved_model.load(str(repo / "bags" / "2"))
    vector = loaded.signatures["serving_default"](image_bytes=tf.constant([query.read_bytes()]))["embedding"]
    assert vector.shape == (1, 16)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "-c", "missing.json", "--data-dir", "/tmp"], "does not exist"),
        (["train", "-c", CONFIG, "--data-dir", "{tmp}", "--set", "model.batch.P=0"], "model.batch.P"),
        (["train", "-c", CONFIG, "--data-dir", "{tmp}", "--set", "model.fit.loss=nope"], "model.fit.loss"),
        (["train", "-c", CONFIG, "--data-dir", "{tmp}"], "image folder"),
        (["embed", "-c", CONFIG, "--data-dir", "{tmp}"], "image folder"),
        (["test", "-c", CONFIG, "--data-dir", "{tmp}"], "embed"),
        (["evaluation", "-c", CONFIG, "--data-dir", "{tmp}"], "embed"),
        (
            [
                "export",
                "-c",
                CONFIG,
                "--data-dir",
                "{tmp}",
                "--model-repo",
                "{tmp}/m",
                "--set",
                "model.name=small_cnn",
            ],
            "no checkpoint",
        ),
    ],
)
def test_bad_input_gives_a_clear_message_and_nonzero_exit(tmp_path, capsys, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_parser_rejects_bad_numbers(capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["evaluation", "-c", CONFIG, "-t", "0"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err


@pytest.mark.slow
def test_a_checkpoint_of_another_architecture_is_a_clear_error(tmp_path, capsys):
    data = tmp_path / "data"
    write_original_dataset(data, per_class_train=2, per_class_test=2, size=36)
    assert main(["train", *_args(data, "--set", "model.fit.epochs=1", "--no-progress")]) == 0
    capsys.readouterr()
    assert main(["embed", *_args(data, "--set", "model.embedding_dim=8", "--run-name", RUN)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the model" in err and "Traceback" not in err
