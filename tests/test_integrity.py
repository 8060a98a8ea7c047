"""Fault injection: one small pipeline (prepare → teacher × 2 → align → assemble → train), then
each kind of file is damaged, planted or contended in a private copy of it, and the stage
that reads it must refuse: exit status 2, the file or flag named, no traceback, and no output
left that looks complete. The copy holds its models and corpus, so the relative paths the
manifests record travel with it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fusellm_kernels.cli import main
from fusellm_kernels.store.lock import JobLock, LockedError, confirm_holder
from fusellm_kernels.store.manifest import StoreError, forget_verified, sha256_file
from tests.fixtures_models import (  # noqa: F401 (fixtures)
    models_dir,
    tiny_corpus,
    tiny_gpt2,
    tiny_llama,
    tok_bytelevel,
    tok_metaspace,
)

REPO = Path(__file__).resolve().parents[1]
TEACHER = ["--top-k", "6", "--docs-per-shard", "10"]
TRAIN = ["--preset", "tiny", "--seq-len", "48", "--global-batch", "2", "--max-steps", "2", "--checkpoint-every", "1",
         "--no-plot", "--no-export"]


@pytest.fixture(autouse=True)
def _fresh_verification():
    """Files are damaged in place here; the per-process record of verified files must not hide it."""
    forget_verified()
    yield
    forget_verified()


def cli(capsys, *args: str) -> tuple[int, str]:
    """Run `fusellm ARGS` in-process; (exit status, stderr + stdout)."""
    try:
        rc = main([str(a) for a in args] + ["--no-progress"])
    except SystemExit as e:
        rc = int(e.code) if isinstance(e.code, int) else 2
    out = capsys.readouterr()
    text = out.err + out.out
    assert "Traceback" not in text
    return rc, text


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, tiny_corpus, tiny_llama, tiny_gpt2) -> Path:
    from fusellm_kernels.pipeline.align_job import AlignConfig, run_align
    from fusellm_kernels.pipeline.assemble import AssembleConfig, run_assemble
    from fusellm_kernels.pipeline.teacher_pass import TeacherConfig, run_teacher_pass

    d = tmp_path_factory.mktemp("integrity")
    shutil.copytree(tiny_llama, d / "models/llama")
    shutil.copytree(tiny_gpt2, d / "models/gpt2")
    shutil.copytree(tiny_corpus, d / "corpus")
    for name, model in (("target", "llama"), ("source", "gpt2")):
        run_teacher_pass(TeacherConfig(corpus=str(d / "corpus"), model=str(d / "models" / model), output=str(d / name),
                                       top_k=6, docs_per_shard=10, progress=False))
    run_align(AlignConfig(target=str(d / "target"), source=str(d / "source"), output=str(d / "align"), progress=False))
    run_assemble(AssembleConfig(target=str(d / "target"), sources=(str(d / "align"),), output=str(d / "blocks"),
                                block_len=48, progress=False))
    return d


@pytest.fixture
def w(pipe, tmp_path) -> Path:
    """A private copy of the pipeline (lock files are not copied)."""
    shutil.copytree(pipe, tmp_path / "w", ignore=shutil.ignore_patterns(".fusellm.lock"))
    return tmp_path / "w"


def flip(path: Path, offset_from_end: int = 16, n: int = 1) -> None:
    """Flip n bytes near the end of a file: past the safetensors header, inside the data."""
    data = bytearray(path.read_bytes())
    for i in range(n):
        data[-offset_from_end - i] ^= 0xFF
    path.write_bytes(bytes(data))


def _align(w: Path, out: str = "align2", *extra: str) -> list[str]:
    return ["align", "--target", w / "target", "--source", w / "source", "--output", w / out, *extra]


def _assemble(w: Path, out: str = "blocks2", *extra: str) -> list[str]:
    return ["assemble", "--target", w / "target", "--alignments", w / "align", "--output", w / out, "--block-len", "48", *extra]


def _train(w: Path, out: str = "run", model: str = "models/llama", *extra: str) -> list[str]:
    return ["train", "--model", w / model, "--data", w / "blocks", "--output", w / out, *TRAIN, *extra]


# --- A1: one job per output -----------------------------------------------------------------


def test_second_writer_is_refused_and_a_dead_holder_releases(w, capsys):
    """A job holding the output (another process, paused) makes a second one refuse at once,
    naming the directory and the holder; once the holder is killed the same command runs."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fusellm_kernels.store.lock import JobLock; "
         f"JobLock({str(w / 'align2')!r}, 'write', 'paused test job').acquire(); print('locked', flush=True); sys.stdin.read()"],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, text = cli(capsys, *_align(w))
        assert rc == 2 and str(w / "align2") in text and f"pid {holder.pid}" in text and "paused test job" in text
        assert not (w / "align2" / "manifest.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, text = cli(capsys, *_align(w))
    assert rc == 0, text
    assert (w / "align2" / "manifest.json").exists()


def test_two_trainings_into_one_output_are_refused(w, capsys):
    with JobLock(w / "run", "write", "fusellm train"):
        rc, text = cli(capsys, *_train(w))
    assert rc == 2 and str(w / "run") in text and "in use by job" in text
    assert not (w / "run" / "metrics.jsonl").exists()


def test_overwrite_of_a_store_being_read_is_refused(w, capsys):
    before = sha256_file(w / "target" / "manifest.json")
    with JobLock(w / "target", "read", "fusellm align"):
        rc, text = cli(capsys, "teacher", "--corpus", w / "corpus", "--model", w / "models/llama", "--output", w / "target",
                       *TEACHER, "--overwrite")
    assert rc == 2 and "being read by another job" in text and str(w / "target") in text
    assert sha256_file(w / "target" / "manifest.json") == before  # nothing was deleted


def test_a_reader_refuses_a_store_being_written(w, capsys):
    with JobLock(w / "source", "write", "fusellm teacher"):
        rc, text = cli(capsys, *_align(w))
    assert rc == 2 and "being written by" in text and str(w / "source") in text


def test_other_ranks_check_the_job_id(w):
    with JobLock(w / "x", "write", "fusellm train", job_id="job-a"):
        confirm_holder(w / "x", "job-a")
        with pytest.raises(LockedError, match="not by this job"):
            confirm_holder(w / "x", "job-b")


# --- A2: checksums are checked ----------------------------------------------------------------


def test_flipped_byte_in_a_teacher_shard_is_refused_by_align(w, capsys):
    flip(w / "target/shards/shard-00001.safetensors")
    rc, text = cli(capsys, *_align(w))
    assert rc == 2 and "shard-00001.safetensors" in text and "fusellm teacher" in text and "SHA-256" in text
    assert not (w / "align2" / "manifest.json").exists()


def test_flipped_byte_in_an_alignment_shard_is_refused_by_assemble(w, capsys):
    flip(w / "align/shards/align-00000.safetensors")
    rc, text = cli(capsys, *_assemble(w))
    assert rc == 2 and "align-00000.safetensors" in text and "fusellm align" in text
    assert not (w / "blocks2" / "manifest.json").exists()
    # --no-verify is the stated escape hatch: the damage then passes into the blocks
    rc, text = cli(capsys, *_assemble(w, "blocks3", "--no-verify"))
    assert rc == 0, text


def test_flipped_bytes_in_blocks_or_a_store_are_refused_by_train(w, capsys):
    flip(w / "blocks/shards/blocks-00000.safetensors")
    rc, text = cli(capsys, *_train(w))
    assert rc == 2 and "blocks-00000.safetensors" in text and "fusellm assemble" in text
    assert not (w / "run" / "export").exists()


def test_flipped_logit_in_a_source_store_is_refused_by_train(pipe, w, capsys):
    flip(w / "source/shards/shard-00000.safetensors", offset_from_end=400)
    rc, text = cli(capsys, *_train(w))
    assert rc == 2 and "source" in text and "shard-00000.safetensors" in text and "fusellm teacher" in text


def test_replaced_vocab_map_is_refused_downstream_and_on_resume(w, capsys):
    vm = w / "align" / "vocab_map.pt"
    torch.save(torch.zeros_like(torch.load(vm, weights_only=True)), vm)  # an all-zero map: everything maps to id 0
    rc, text = cli(capsys, *_train(w))
    assert rc == 2 and "vocab_map.pt" in text
    rc, text = cli(capsys, *_assemble(w))
    assert rc == 2 and "vocab_map.pt" in text
    # re-running align in place must not adopt the new map (and record its hash)
    (w / "align" / "manifest.json").unlink()
    rc, text = cli(capsys, *_align(w, "align"))
    assert rc == 2 and "vocab_map.pt" in text
    assert not (w / "align" / "manifest.json").exists()


def test_teacher_resume_rewrites_a_damaged_shard(w, capsys):
    shard = w / "target/shards/shard-00000.safetensors"
    good = sha256_file(shard)
    flip(shard)  # same size: a resume that compared sizes only would keep it
    (w / "target" / "manifest.json").unlink()
    with pytest.warns(RuntimeWarning, match="does not match its checksum"):
        rc, text = cli(capsys, "teacher", "--corpus", w / "corpus", "--model", w / "models/llama", "--output", w / "target",
                       *TEACHER)
    assert rc == 0, text
    assert sha256_file(shard) == good  # rewritten byte-identically


# --- A3: paths in manifests -------------------------------------------------------------------


@pytest.mark.parametrize("planted", ["../outside/x.safetensors", "/etc/passwd"])
def test_shard_paths_outside_the_store_are_refused(w, capsys, planted):
    (w / "outside").mkdir(exist_ok=True)
    shutil.copy2(w / "target/shards/shard-00000.safetensors", w / "outside/x.safetensors")
    m = json.loads((w / "target/manifest.json").read_text())
    m["shards"][0]["file"] = planted
    (w / "target/manifest.json").write_text(json.dumps(m))
    rc, text = cli(capsys, *_align(w))
    assert rc == 2 and planted in text and str(w / "target" / "manifest.json") in text


def test_recorded_paths_are_relative_and_old_manifests_still_resolve(w, tmp_path):
    from fusellm_kernels.store.blocks import BlockStore
    from fusellm_kernels.store.format import TeacherStore

    m = json.loads((w / "target/manifest.json").read_text())
    assert m["format_version"] == 2 and not os.path.isabs(m["model"]["path"])
    assert TeacherStore(w / "target").path_of("model") == w / "models/llama"
    bs = BlockStore(w / "blocks")
    assert bs.candidate_path(1, "store") == w / "source" and bs.candidate_path(1, "vocab_map") == w / "align/vocab_map.pt"
    # a version-1 manifest recorded the paths as given: they keep working, with a warning
    m.update(format_version=1, model={**m["model"], "path": str(w / "models/llama")})
    (w / "target/manifest.json").write_text(json.dumps(m))
    with pytest.warns(UserWarning, match="format_version 1"):
        assert TeacherStore(w / "target").path_of("model") == w / "models/llama"


# --- A4: nothing is unpickled -----------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_a_pickled_object_as_vocab_map_is_never_unpickled(w):
    from fusellm_kernels.pipeline.align_job import load_vocab_map
    from fusellm_kernels.store.manifest import write_json_atomic

    torch.save({"map": _Payload()}, w / "align" / "vocab_map.pt")
    write_json_atomic(w / "align" / "vocab_map.json", {"file": "vocab_map.pt", "sha256": sha256_file(w / "align/vocab_map.pt"),
                                                       "size_bytes": (w / "align/vocab_map.pt").stat().st_size})
    with pytest.raises(StoreError, match="cannot be read as a tensor"):
        load_vocab_map(w / "align")


def test_damaged_checkpoint_is_refused_and_an_unlisted_one_warns(w, capsys):
    rc, text = cli(capsys, *_train(w))
    assert rc == 0, text
    ckpt = w / "run/checkpoints/step-00000002"
    listing = json.loads((ckpt / "fusellm_checksums.json").read_text())
    assert ".metadata" in listing["files"] and "__0_0.distcp" in listing["files"]
    keep = w / "kept"
    shutil.copytree(ckpt, keep)
    flip(ckpt / "__0_0.distcp", offset_from_end=64, n=4)
    rc, text = cli(capsys, *_train(w))  # the same command: resumes from step 2, loading it
    assert rc == 2 and "__0_0.distcp" in text and "damaged" in text and "--no-resume" in text
    rc, text = cli(capsys, "verify", w / "run")
    assert rc == 2 and "__0_0.distcp" in text
    # a checkpoint from before checksum lists: loads, with a warning
    shutil.rmtree(ckpt)
    shutil.copytree(keep, ckpt)
    (ckpt / "fusellm_checksums.json").unlink()
    with pytest.warns(UserWarning, match="no fusellm_checksums.json"):
        rc, text = cli(capsys, *_train(w))
    assert rc == 0, text


# --- A5: foreign tokenizers -------------------------------------------------------------------


def test_swapped_tokenizer_is_refused_by_align(w, capsys):
    shutil.copy2(w / "models/gpt2/tokenizer.json", w / "models/llama/tokenizer.json")
    rc, text = cli(capsys, *_align(w))
    assert rc == 2 and str(w / "models" / "llama") in text and "fingerprint" in text
    assert not (w / "align2" / "manifest.json").exists()


def test_model_whose_tokenizer_made_none_of_the_blocks_is_refused(w, capsys):
    shutil.copytree(w / "models/llama", w / "models/other")
    shutil.copy2(w / "models/gpt2/tokenizer.json", w / "models/other/tokenizer.json")  # same weights, another tokenizer
    rc, text = cli(capsys, *_train(w, "run", "models/other"))
    assert rc == 2 and "--model" in text and "did not make the blocks" in text
    rc, text = cli(capsys, "eval", "--model", w / "models/other", "--data", w / "blocks")
    assert rc == 2 and "--model" in text and "did not make the blocks" in text


# --- A6: fusellm verify -----------------------------------------------------------------------


def test_verify_passes_intact_outputs_and_lists_every_problem(w, capsys):
    rc, text = cli(capsys, "verify", w / "target", w / "source", w / "align", w / "blocks")
    assert rc == 0, text
    assert text.count(": OK") == 4
    flip(w / "target/shards/shard-00000.safetensors")
    (w / "target/shards/shard-00001.safetensors").unlink()
    flip(w / "align/vocab_map.pt", offset_from_end=8)
    rc, text = cli(capsys, "verify", w / "target", w / "align", w / "blocks")
    assert rc == 2
    assert "shard-00000.safetensors does not match" in text and "shard-00001.safetensors is listed" in text
    assert "vocab_map.pt" in text and "blocks: " in text  # the blocks name the damaged vocab map too
    rc, text = cli(capsys, "verify", w / "nowhere")
    assert rc == 2 and "does not exist" in text


def test_two_main_jobs_into_one_run_directory_are_refused(tmp_path, capsys):
    with JobLock(tmp_path / "fuse", "write", "fusellm fuse"):
        rc, text = cli(capsys, "fuse", "--preset", "smoke", "--output", tmp_path / "fuse")
    assert rc == 2 and str(tmp_path / "fuse") in text and "in use by job" in text
    assert not (tmp_path / "fuse" / "config.json").exists()
