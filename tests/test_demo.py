import numpy as np
from PIL import Image

from jobs.demo import main


def test_demo_trains_and_writes_the_comparison_grid(tmp_path, capsys):
    main(["--epochs", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "epoch 1/1 G_GAN=" in out and "img/s" in out
    grid = np.asarray(Image.open(tmp_path / "demo.png"))
    # 4 held-out rows x (label | generated | real) tiles of 64x128 with 2-pixel gutters
    assert grid.shape == (4 * 66 + 2, 3 * 130 + 2, 3)
    assert str(tmp_path / "demo.png") in out
