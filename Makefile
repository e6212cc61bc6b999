# `make test` and `make demo` each set up everything on a fresh machine, then run.
# MLX flavour: macOS -> mlx (Metal); Linux -> mlx[cpu], or mlx[cuda13] with MLX_BACKEND=cuda.

VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
UNAME_S := $(shell uname -s)

ifeq ($(UNAME_S),Darwin)
  EXTRAS := test,bench
else ifeq ($(MLX_BACKEND),cuda)
  EXTRAS := cuda,test,bench
else
  EXTRAS := cpu,test,bench
endif

comma := ,
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: test demo info bench venv clang clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	touch $@

# The Metal compile check needs clang++; install it where we can, otherwise the
# check skips itself with a visible message.
clang:
	@command -v clang++ >/dev/null 2>&1 || \
	  { command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq clang >/dev/null) ; } || \
	  echo "clang++ unavailable: the Metal compile check will be skipped"

test: venv clang
	$(PY) -m pytest tests

demo: venv
	$(PY) -m mlx_primitives demo

info: venv
	$(PY) -m mlx_primitives info

bench: venv
	$(PY) -m benchmarks.run --suite all

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
