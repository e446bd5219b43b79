"""Push a folder written by `save_pruned` or `heal.save_healed` to the Hugging Face Hub.

The token is handed to huggingface_hub untouched (argument, `HF_TOKEN` or the stored login) and
never printed or logged here.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = True,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create `repo_id` if needed (private by default) and upload `folder`; return the repo URL."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
        raise FileNotFoundError(
            f"{folder} has no config.json; push a folder written by `sglp-llm prune` or "
            "`sglp-llm heal` (a model, or a LoRA adapter with its adapter_config.json)."
        )
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=url.repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload SGLP-pruned model",
    )
    return str(url)
