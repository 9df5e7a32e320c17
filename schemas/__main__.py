"""``python -m schemas`` rewrites schemas/json/ from the models."""

from ._generate import write_schemas

for path in write_schemas():
    print(path)
