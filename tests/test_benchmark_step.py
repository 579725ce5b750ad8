"""The step benchmark stays runnable (it is what the GPU work measures with); not a performance assertion."""

from benchmarks.step import main


def test_step_benchmark_prints_one_row_per_combination(capsys):
    main(["--config", "tiny", "--batch", "1", "2", "--steps", "1", "--warmup", "1", "--device", "cpu"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("tiny ")]
    assert [(r[1], r[2]) for r in rows] == [("1", "fp32"), ("2", "fp32")]
    assert all(float(r[3]) > 0 for r in rows)  # img/s
    assert rows[0][-1] == "1.00"  # ratio to the first row
