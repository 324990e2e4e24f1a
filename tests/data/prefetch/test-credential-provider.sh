#!/bin/sh
# TEST-ONLY kubelet image credential provider plugin (exec protocol, credentialprovider.kubelet.k8s.io/v1).
# Reads a CredentialProviderRequest on stdin, appends it to $TEST_CREDENTIAL_LOG, and answers with the
# credentials in its environment for $TEST_CREDENTIAL_REGISTRY, cached per registry for 5 minutes.
set -eu
request=$(cat)
printf '%s\n' "$request" >>"$TEST_CREDENTIAL_LOG"
if [ "${1:-}" != get-credentials ]; then
  echo "unexpected arguments: $*" >&2
  exit 2
fi
case "$request" in
*'"kind":"CredentialProviderRequest"'*) ;;
*)
  echo "stdin is not a CredentialProviderRequest" >&2
  exit 1
  ;;
esac
printf '{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse",'
printf '"cacheKeyType":"Registry","cacheDuration":"5m",'
printf '"auth":{"%s":{"username":"%s","password":"%s"}}}\n' \
  "$TEST_CREDENTIAL_REGISTRY" "$TEST_CREDENTIAL_USER" "$TEST_CREDENTIAL_PASSWORD"
