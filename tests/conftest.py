import importlib.util
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, RepoUrl

# Tests never touch the network: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def run_in_triton_interpreter(code: str, timeout: int = 600) -> None:
    """Runs ``code`` in a child Python with TRITON_INTERPRET=1 (the interpreter must be on before Triton is first
    imported, so it cannot run in the test process) and asserts that it finished and printed OK."""
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]


@pytest.fixture
def triton_interpreter():
    """``run_in_triton_interpreter``, for the kernels' interpreter tests: CPU machines only (a CUDA machine runs the
    kernels themselves in the GPU tests; Triton 3.6's interpreter there also fails with numpy 2.5 on unchanged
    kernels) that have Triton installed."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run where there is no CUDA device")
    if importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    return run_in_triton_interpreter


WORDS = "what color is the shape red green blue square circle triangle a how many shapes one two three".split()


@pytest.fixture(scope="session")
def words():
    return WORDS


# ----------------------------------------------------------------------------------------------------------------
# The Hub, intercepted: push_to_hub tests check which calls and files would go out, without network.
# ----------------------------------------------------------------------------------------------------------------
class FakeHub:
    """Records the Hub calls of one test and keeps each repo's committed files under ``root/<repo_id>``."""

    def __init__(self, root: Path):
        self.root = root
        self.calls = []
        self.existing_files = set()  # (repo_id, path) that "already exist" on the Hub

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def install(self, monkeypatch):
        fake = self

        def create_repo(self, repo_id, *, token=None, private=None, exist_ok=False, **kwargs):
            fake.calls.append(("create_repo", repo_id, {"private": private, "exist_ok": exist_ok}))
            return RepoUrl(f"https://huggingface.co/{repo_id}")

        def file_exists(self, repo_id, filename, *, repo_type=None, revision=None, token=None):
            fake.calls.append(("file_exists", repo_id, {"filename": filename}))
            return (repo_id, filename) in fake.existing_files

        def create_branch(self, repo_id, *, branch, token=None, exist_ok=False, **kwargs):
            fake.calls.append(("create_branch", repo_id, {"branch": branch}))

        def create_commit(self, repo_id, operations, *, commit_message, commit_description=None, token=None,
                          repo_type=None, revision=None, create_pr=None, **kwargs):
            operations = list(operations)
            fake.calls.append(("create_commit", repo_id, {"message": commit_message, "revision": revision,
                                                          "paths": sorted(op.path_in_repo for op in operations)}))
            for op in operations:
                target = fake.folder(repo_id) / op.path_in_repo
                target.parent.mkdir(parents=True, exist_ok=True)
                source = op.path_or_fileobj
                target.write_bytes(Path(source).read_bytes() if isinstance(source, (str, os.PathLike)) else source)
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{'0' * 40}",
                              commit_message=commit_message, commit_description=commit_description or "",
                              oid="0" * 40)

        def forbidden(name):
            def fail(*args, **kwargs):
                raise AssertionError(f"unexpected Hub call HfApi.{name}")
            return fail

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "file_exists", file_exists)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        for name in ("upload_folder", "upload_file", "upload_large_folder", "preupload_lfs_files", "delete_file",
                     "delete_folder", "model_info", "repo_info"):
            if hasattr(HfApi, name):
                monkeypatch.setattr(HfApi, name, forbidden(name))

    def commits(self):
        return [call for call in self.calls if call[0] == "create_commit"]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "remote")
    fake.install(monkeypatch)
    return fake
