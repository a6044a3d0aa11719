from meshforge.train.logs import MetricsLog, plot_curves, read_csv


def test_csv_rows_columns_and_resume_truncation(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricsLog(path)
    for step in range(1, 5):
        log.log(step, {"loss": 1.0 / step, "acc": step / 10})
    log.log(4, {"val_loss": 0.3})
    log.close()
    rows = read_csv(path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 4]
    assert rows[2]["loss"] == 1.0 / 3  # full precision: resumed curves compare exactly
    assert "val_loss" not in rows[0] and rows[4] == {"step": 4, "val_loss": 0.3}
    assert path.read_text().splitlines()[0] == "step,loss,acc,val_loss"

    resumed = MetricsLog(path, keep_until_step=2)  # rows after the checkpoint are redone
    resumed.log(3, {"loss": 0.5})
    resumed.close()
    assert [(r["step"], r["loss"]) for r in read_csv(path)] == [(1, 1.0), (2, 0.5), (3, 0.5)]


def test_plot_curves_writes_a_png(tmp_path):
    log = MetricsLog(tmp_path / "m.csv")
    for step in range(1, 6):
        log.log(step, {"loss": 2.0 / step, "acc": step / 6, "lr": 1e-3})
    log.log(5, {"val_loss": 0.5, "val_face_acc": 0.7})
    log.close()
    plot_curves(tmp_path / "m.csv", tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
