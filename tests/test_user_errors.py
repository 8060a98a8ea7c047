"""A user's mistake ends in a one-line refusal that names the flag or file (exit code 2, no
traceback), before anything is written; options are checked before the first stage runs.

Every test calls the command line in-process (`fusellm_kernels.cli.main`) and reads its
stderr, so a traceback would surface as the test's own exception.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from fusellm_kernels.cli import main
from tests.fixtures_models import tiny_corpus, tiny_llama, models_dir, tok_bytelevel  # noqa: F401 (fixtures)


def _refused(capsys: pytest.CaptureFixture[str], argv: list[str], *names: str) -> str:
    """Run argv; it must exit with 2 and a stderr naming every one of `names`."""
    try:
        rc: Any = main(argv)
    except SystemExit as e:  # train, eval and fuse exit through SystemExit(2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    for name in names:
        assert name in err, err
    return err


# --- fusellm fuse: every option of every stage before the first stage ------------------------


@pytest.mark.parametrize("bad, named", [
    (dict(eval_every=-1), "eval_every"),
    (dict(eval_blocks=-1), "eval_blocks"),
    (dict(warmup_ratio=1.5), "warmup_ratio"),
    (dict(lr=0.0), "FuseConfig.lr"),
    (dict(weighting="row"), "weighting"),
    (dict(fusion_rows="all"), "fusion_rows"),
    (dict(top_k=0), "top_k"),
    (dict(teacher_overflow="wrap"), "teacher_overflow"),
    (dict(vocab_align="fuzzy"), "vocab_align"),
    (dict(score="mean"), "score"),
    (dict(block_len=1), "block_len"),
    (dict(block_len=4096), "block_len"),
])
def test_fuse_checks_every_stage_option_before_any_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         bad: dict[str, Any], named: str) -> None:
    from fusellm_kernels.demo import job

    def no_stage(*_a: Any, **_k: Any) -> None:
        raise AssertionError("a stage started before every option was checked")

    monkeypatch.setattr(job._Stages, "run", no_stage)
    monkeypatch.setattr(job._Stages, "run_group", no_stage)
    out = tmp_path / "run"
    with pytest.raises(job.FuseError, match=named):
        job.run_fuse(job.preset("smoke", output=str(out), **bad), say=lambda _m: None)
    assert not out.exists()  # nothing written


def test_fuse_flags_are_refused_by_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _refused(capsys, ["fuse", "--preset", "smoke", "--train-steps", "-3", "--output", str(tmp_path / "run")], "--train-steps")
    assert not (tmp_path / "run").exists()
    (tmp_path / "file").write_text("not a directory")
    _refused(capsys, ["fuse", "--preset", "smoke", "--output", str(tmp_path / "file")], "--output", "is a file")


# --- fusellm teacher: the model folder and the device, before anything is written ------------


def test_teacher_refuses_a_model_without_weights_and_a_bad_device(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  tiny_llama: Path, tiny_corpus: Path) -> None:  # noqa: F811
    bare = tmp_path / "no-weights"
    shutil.copytree(tiny_llama, bare, ignore=shutil.ignore_patterns("*.safetensors"))
    base = ["teacher", "--corpus", str(tiny_corpus), "--no-progress"]
    _refused(capsys, [*base, "--model", str(bare), "--output", str(tmp_path / "t1")], str(bare), "holds no weights")
    assert not (tmp_path / "t1").exists()  # no settings.json left behind
    _refused(capsys, [*base, "--model", str(tiny_llama), "--output", str(tmp_path / "t2"), "--device", "tpu:7"],
             "--device", "tpu:7")
    assert not (tmp_path / "t2").exists()


# --- fusellm train / eval: the flag the user gave, not one derived from it --------------------


def test_train_and_eval_name_the_flag_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "blocks"), "--micro-batch", "0"],
                   "--micro-batch")
    assert "--global-batch" not in err
    _refused(capsys, ["train", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "blocks"), "--output",
                      str(tmp_path / "run"), "--device", "tpu:7", "--no-progress"], "--device", "tpu:7")
    _refused(capsys, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "blocks"), "--device", "tpu:7"],
             "--device")


def test_gpt_neox_target_with_embed_out_head_trains_and_exports(tmp_path: Path) -> None:
    """GPT-NeoX names its output layer embed_out: the trainer finds it by role."""
    from safetensors import safe_open
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from fusellm_kernels.training.config import preset
    from fusellm_kernels.training.synthetic import SyntheticSpec, write_synthetic_run
    from fusellm_kernels.training.train import train

    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=128, eos_token_id=0, bos_token_id=1,
                                     tie_word_embeddings=False)).save_pretrained(tmp_path / "neox")
    blocks = write_synthetic_run(tmp_path / "data", SyntheticSpec())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # hidden size 32: threads cost more than they save
    try:
        r = train(preset("tiny", model=str(tmp_path / "neox"), data=str(blocks), output=str(tmp_path / "run"),
                         max_steps=1, checkpoint_every=0, eval_holdout=2, plot=False))
    finally:
        torch.set_num_threads(threads)
    with safe_open(str(Path(r["export"]) / "model.safetensors"), framework="pt") as f:
        assert "embed_out.weight" in set(f.keys())  # the source checkpoint's own name for its head
    trained = GPTNeoXForCausalLM.from_pretrained(r["export"])
    start = GPTNeoXForCausalLM.from_pretrained(tmp_path / "neox")
    assert not torch.equal(trained.get_output_embeddings().weight, start.get_output_embeddings().weight)


# --- the stores' readers: a missing folder is "does not exist" --------------------------------


def test_align_on_a_missing_folder_says_it_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _refused(capsys, ["align", "--target", str(tmp_path / "nope"), "--source", str(tmp_path / "nope2"),
                            "--output", str(tmp_path / "al"), "--no-progress"], str(tmp_path / "nope"), "does not exist")
    assert "manifest.json is missing" not in err
    err = _refused(capsys, ["assemble", "--target", str(tmp_path / "nope"), "--alignments", str(tmp_path / "al2"),
                            "--output", str(tmp_path / "b"), "--no-progress"], "does not exist")
    err = _refused(capsys, ["eval", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "blocks")],
                   str(tmp_path / "blocks"), "does not exist")
