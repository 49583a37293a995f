"""The wheel carries what an installed package needs: the card templates (kept at the top of the repository in
hub_cards/, mapped to diffusers_erase.hub_cards) and the bundled shapes model."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_holds_the_card_templates_and_installs_them(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path), str(ROOT)], check=True)
    (wheel,) = tmp_path.glob("diffusers_erase-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for template in (ROOT / "hub_cards").glob("*.md"):
        assert f"diffusers_erase/hub_cards/{template.name}" in names, template.name
    assert "diffusers_erase/shapes/assets/pipeline/unet/diffusion_pytorch_model.safetensors" in names
    assert not any(name.startswith("hub_cards/") for name in names)  # mapped into the package, not top level
    # Installed into a bare venv (no dependencies: nothing is imported), the files land inside the package.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(site),
                    str(wheel)], check=True)
    assert (site / "diffusers_erase" / "hub_cards" / "adapter.md").read_text() == (
        ROOT / "hub_cards" / "adapter.md").read_text()
