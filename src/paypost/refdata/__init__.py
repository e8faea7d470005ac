"""Reference data for enrichment (FR6): tenants, accounts master, branches, FX rates, merchants.

- `paypost.refdata.model`: the records, `RefData` (one versioned snapshot, dict lookups) and the
  `RefDataPort` protocol enrichment reads;
- `paypost.refdata.files`: `load_refdata_dir` / `write_refdata_dir` (formats: docs/refdata.md);
- `paypost.refdata.store`: snapshots in SQLite, holder personal data AES-GCM encrypted;
- `paypost.refdata.generate`: `generate_refdata(n_accounts, tenants, seed, tokenizer)`.
"""
