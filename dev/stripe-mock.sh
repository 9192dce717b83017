#!/usr/bin/env bash
# Stripe's official API mock (github.com/stripe/stripe-mock), built from the Go module proxy.
# It answers from Stripe's OpenAPI spec: it validates request parameters but keeps no state, so
# the stripe-standin contract test uses it to check that our local Stripe accepts and refuses
# the same requests as Stripe's own spec does.
#   dev/stripe-mock.sh install   build the binary into CACHE/stripe-mock/bin (once per version)
#   dev/stripe-mock.sh path      print the binary's path (exit 1 when not installed)
set -euo pipefail
# shellcheck disable=SC2034 # read by log() in lib.sh
LOG_TAG=stripe-mock
# shellcheck source=dev/lib.sh disable=SC1091 # followed with shellcheck -x, as dev/test runs it
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Pinned so that the contract test checks against one known spec; bump it on purpose.
VERSION=v0.203.0
BIN_DIR=$CACHE/stripe-mock/bin
BIN=$BIN_DIR/stripe-mock
MARKER=$BIN_DIR/.version

installed() { [[ -x $BIN && -f $MARKER && $(<"$MARKER") == "$VERSION" ]]; }

cmd_install() {
  installed && return 0
  command -v go >/dev/null || die "go is required to build stripe-mock"
  # A lock so dev/up and a test run starting at once do not both build into the same folder.
  # In a subshell so the lock is released when the install is done.
  (
    lock "$CACHE/stripe-mock.lock"
    installed && exit 0
    mkdir -p "$BIN_DIR"
    log "building stripe-mock $VERSION (first run only)"
    # The marker is written only after go install succeeded, so an interrupted build is
    # retried on the next run.
    GOBIN=$BIN_DIR go install "github.com/stripe/stripe-mock@$VERSION"
    printf '%s\n' "$VERSION" >"$MARKER"
  )
}

cmd_path() {
  installed || die "stripe-mock is not installed: run dev/stripe-mock.sh install"
  printf '%s\n' "$BIN"
}

case ${1:-} in
install) cmd_install ;;
path) cmd_path ;;
*) usage "$0 install|path" ;;
esac
