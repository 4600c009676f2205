"""The model card written next to the trained weights (and pushed with them)."""

from __future__ import annotations

from pathlib import Path

import yaml

from .config import TrainingConfig

STAGE_NAMES = {0: "ControlNet (stage 0)", 1: "mapping network M (stage 1)", 2: "style modulation network T (stage 2)",
               "inverter": "photo encoder (pSp / e4e inverter)",
               "mm2latent": "MM2Latent engine (latent mapper and mask/sketch autoencoders)"}


def model_card(config: TrainingConfig, final_logs: dict | None = None, metrics: dict | None = None) -> str:
    """Markdown with Hub metadata: what was trained, on which data (and its license), config, losses, metrics."""
    card = config.model_card
    metrics = {**card.metrics, **(metrics or {})}
    header = {
        "library_name": "mm2latent",
        "license": "other",
        "license_name": "celebamask-hq-non-commercial",
        "tags": ["mm2latent", "face-generation", "stylegan2", "controlnet", "gan-inversion"],
        "pipeline_tag": "text-to-image",
    }
    lines = [
        "---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
        f"# mm2latent — {STAGE_NAMES[config.stage]}", "",
        "Trained with `python -m mm2latent.training` (reference implementation of *Diffusion-driven GAN Inversion "
        "for Multi-Modal Face Image Generation*, Kim et al., CVPR 2024).", "",
        "## Training data", "", f"{card.data}.", "",
        f"**Data license:** {card.data_license}. These weights are derived from that data and inherit its "
        "terms: research and non-commercial use only.", "",
    ]
    if final_logs:
        lines += ["## Final training losses", "", "| term | value |", "|---|---|"]
        lines += [f"| {k} | {v:.5g} |" for k, v in final_logs.items() if isinstance(v, float)]
        lines.append("")
    if metrics:
        lines += ["## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines.append("")
    lines += ["## Training configuration", "", "```yaml", yaml.safe_dump(config.to_dict(), sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_model_card(folder: str | Path, config: TrainingConfig, final_logs: dict | None = None, metrics: dict | None = None) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(model_card(config, final_logs, metrics))
    return path


def push_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Create (if needed) the Hub repository and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="mm2latent training run"))
