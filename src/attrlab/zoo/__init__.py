"""The model zoo: tiny trained models with known answers, bundled for offline use."""
