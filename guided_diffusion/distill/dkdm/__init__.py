"""DKDM: the dynamic pool of teacher states (`pool`), its cache files (`cache`), its objective and the
checks and builders of a run (`setup`)."""
