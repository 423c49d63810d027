from captioning.cli import main


def test_data_command_on_synthetic(tmp_path, capsys):
    assert main(["data", "--n-train", "20", "--grid", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "vocabulary:" in out and (tmp_path / "g.png").exists()


def test_data_command_reports_a_missing_folder(tmp_path, capsys):
    assert main(["data", "--dataset", "flickr8k", "--root", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
