"""The `make demo` job runs end to end and prints its table."""
from fastprune import demo


def test_demo_prints_table(capsys):
    demo.main()
    out = capsys.readouterr().out
    assert "dense MLP" in out
    for name in ["magnitude", "random-uniform", "random-erk", "taylor (LM)", "OBD", "QM", "woodfisher"]:
        assert name in out
    assert "s=95%" in out
