from earlin_sklearn.__main__ import main


def test_demo_prints_the_table(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "AUROC %" in out and "not uploaded %" in out
    rows = {line[:24].strip(): line[24:].split() for line in out.splitlines()[2:7]}
    assert set(rows) == {"ID test digits", "natural photo patches", "printed letters", "Gaussian noise", "uniform noise"}
    assert float(rows["ID test digits"][-1]) < 15.0  # most ID inputs are uploaded
    for name in ("natural photo patches", "uniform noise"):
        assert float(rows[name][1]) > 95.0  # AUROC
