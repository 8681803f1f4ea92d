"""The papers' tables as data, planned into the seed READMEs' commands and run resumably (run_table.py)."""
