"""loradock's ML core: base model, LoRA math, training, artifacts, stores, drift statistics.

Never imports the service layer, fastapi, SQLAlchemy or prometheus_client.
"""
