"""The toolkit's command-line tools beyond the front ends (conversion, batch captioning, the tiny models' data,
tokenizers and demos). Each runs as `python scripts/<name>.py`; they import each other, and the tests import
them, as `scripts.<name>`."""
