# The commands of README.md. `make demo`: install, then train and test on generated data.
# `make test`: install, then run the test suite. Both install into .venv (made if missing).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := data/demo
DEMO_OPTIONS := --train_data_root=$(DEMO)/train --test_data_root=$(DEMO)/test1 \
	--model=ResNet34 --image_size=64 --batch_size=16 --max_epoch=12

.PHONY: install demo test clean

install: $(VENV)/installed

# PIP_CONSTRAINT reaches the isolated build environments of pip before 26.2;
# PIP_BUILD_CONSTRAINT is how pip 26.2 and later are told the same.
$(VENV)/installed: requirements.txt build-constraints.txt
	$(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=build-constraints.txt PIP_BUILD_CONSTRAINT=build-constraints.txt \
		$(BIN)/python -m pip install -r requirements.txt
	$(BIN)/python -m tools.visdom_server --provision-only || \
		echo "warning: the visdom page will need internet (see README.md, Curves: TensorBoard and visdom)"
	touch $@

# test takes the newest run's best.pth and the test folder that run was given, and writes
# result.csv into the run's folder
demo: install
	$(BIN)/python main.py demo_data --root=$(DEMO)
	$(BIN)/python main.py train $(DEMO_OPTIONS)
	$(BIN)/python main.py test

test: install
	$(BIN)/python -m pytest -q -rs

# the environment and the demo data only: runs in checkpoints/ are yours to delete (README.md)
clean:
	rm -rf $(VENV) $(DEMO)
