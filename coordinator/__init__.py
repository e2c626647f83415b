"""The GPT-FL coordinator: runs federated jobs with the silo agents that dial in."""
