"""The GPT-FL silo agent: runs inside an institution, dials out, trains on local data."""
