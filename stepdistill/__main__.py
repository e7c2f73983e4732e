from .signals import install

install()  # before the heavier imports: a signal in the first second is one line too
from .cli import entry  # noqa: E402

entry()
