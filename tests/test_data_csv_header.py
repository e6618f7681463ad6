"""CSV headers: a column named twice is refused by name, not renamed by pandas ('hr' -> 'hr.1')."""
from lsm2.data.convert import main as convert_main

ROWS = "u1,2024-01-01 00:00,60,61\n"


def test_a_column_named_twice_is_one_error_naming_it_and_the_file(tmp_path, capsys):
  table = tmp_path / "t.csv"
  table.write_text("subject,timestamp,hr,hr\n" + ROWS)
  assert convert_main(["--format", "long_csv", "--input", str(table),
                       "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert err == f"error: {table}: the header names column 'hr' twice; give each column once\n"
  assert not (tmp_path / "out").exists()


def test_every_repeated_column_is_named_with_its_count(tmp_path, capsys):
  table = tmp_path / "t.csv"
  table.write_text("subject,timestamp,hr,steps,hr,steps,hr\n" + ROWS.strip() + ",1,2,3\n")
  assert convert_main(["--format", "long_csv", "--input", str(table),
                       "--out", str(tmp_path / "out")]) == 2
  assert "the header names column 'hr' 3 times, 'steps' twice" in capsys.readouterr().err
