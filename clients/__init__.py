"""The ClientApp (app.py), the node state store (state.py) and the DP-SGD wrapper (dp.py)."""
