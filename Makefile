# kthw-lab: the two commands that matter on a fresh machine are `make lab` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
SCENARIO ?= scenarios/2m2w.yaml
BIN_RELEASE := target/release/kthw-lab

.PHONY: lab test build deps-build deps-test deps-lab deps-bench lint unit bench bench-lb bench-lab clean help

help:
	@echo "make lab    install host packages, build, create the default lab ($(SCENARIO))"
	@echo "make test   install test packages, lint, run every test"
	@echo "make bench  benchmarks against baselines (prints ratio tables)"

deps-build:
	@scripts/deps.sh build
deps-test:
	@scripts/deps.sh build test
deps-lab:
	@scripts/deps.sh build lab
deps-bench:
	@scripts/deps.sh build test bench

build: deps-build
	$(CARGO) build --release --locked

# The lab runs on this host's network. On a machine where lab networks must stay
# isolated (e.g. a shared CI box), use `make lab SANDBOX=1`: the lab then lives in
# a network namespace with its own libvirtd (scripts/netns-run).
# UNTIL=PHASE stops after a phase (e.g. UNTIL=runtime on a host that cannot
# download the Kubernetes binaries).
CREATE_FLAGS := $(if $(UNTIL),--until $(UNTIL),)

lab: deps-lab build
ifeq ($(SANDBOX),1)
	# The sandbox has no network: get the lab's image into the cache first.
	$(BIN_RELEASE) image pull $$($(BIN_RELEASE) plan $(SCENARIO) -o json | sed -n 's/^  "image": "\(.*\)",$$/\1/p')
	scripts/netns-run scripts/sandbox-lab $(abspath $(BIN_RELEASE)) $(SCENARIO) $(CREATE_FLAGS)
else
	$(BIN_RELEASE) create $(SCENARIO) $(CREATE_FLAGS)
endif

lint: deps-build
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# Every test, including the ones that need root, namespaces and real VMs. Real-VM
# tests are #[ignore = "real VMs: ..."], so a plain `cargo test` shows them as ignored
# (never as passed without having run); here they run with the others.
# NOT_IN_MAKE_TEST: the ignored tests that are not checks and stay out of `make test`:
# measurements, a helper that another test starts as a child process, a dump tool
# for a human, and the real image recipe (minutes, a Debian mirror). tests/suite.rs
# checks this list against the #[ignore]s in tests/.
NOT_IN_MAKE_TEST := dump child_process_fetch measure_600mb_download_and_verify \
  real_recipe_builds_verifies_and_is_reused vm_measure_boot_1_and_4_nodes
# NEEDS_NETEM: tests of link delays (tc netem), #[ignore = "needs netem ..."]. They
# run where the kernel has netem and are left out, said so and counted as skipped,
# on a kernel built without it (this build box's).
NEEDS_NETEM := a_delay_with_netem_slows_every_round_trip_with_the_node_until_cleared
NO_NETEM := $(shell zcat /proc/config.gz 2>/dev/null | grep -q 'CONFIG_NET_SCH_NETEM is not set' && echo yes)
LEFT_OUT := $(NOT_IN_MAKE_TEST) $(if $(NO_NETEM),$(NEEDS_NETEM))
unit: deps-test
	@$(if $(NO_NETEM),echo "make test: this kernel has no netem (CONFIG_NET_SCH_NETEM): skipping $(NEEDS_NETEM)";)
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  $(CARGO) nextest run --locked --no-fail-fast --run-ignored all \
	    -E 'all()$(foreach t,$(LEFT_OUT), - test(=$(t)))'; \
	else \
	  $(CARGO) test --locked --no-fail-fast -- --include-ignored --exact \
	    $(foreach t,$(LEFT_OUT),--skip $(t)); \
	fi

test: lint unit

# Benchmarks print ratio tables against baselines run side by side in the same run.
# bench-lab boots real VMs (inside scripts/netns-run) and takes about 10-14 minutes.
bench: bench-lb bench-lab

bench-lb: deps-bench
	$(CARGO) bench --locked --bench lb

bench-lab: deps-bench
	$(CARGO) bench --locked --bench lab

clean:
	$(CARGO) clean
