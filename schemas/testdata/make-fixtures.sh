#!/usr/bin/env bash
# Regenerates the plan-JSON fixtures of `plan::replacements_from_plan`'s unit tests with the
# real `terraform` CLI. Only the built-in `terraform_data` resource is used: no provider download.
#
#   schemas/testdata/make-fixtures.sh     (from the repository root or anywhere)
#
# Produces:
#   plan-create.json   first build of a workspace: everything is created, nothing replaced
#   plan-replace.json  a claim-like second build: `image` and `owner_name` changed, so two
#                      resources are replaced (one via a list, one via an object), one is updated
#                      in place and one is untouched (no-op)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
export TF_IN_AUTOMATION=1 TF_INPUT=0 CHECKPOINT_DISABLE=1
# No CLI configuration is needed (no providers); silences "Unable to open CLI configuration file".
if [ ! -f "${TF_CLI_CONFIG_FILE:-$HOME/.terraformrc}" ]; then export TF_CLI_CONFIG_FILE=/dev/null; fi
cat > main.tf <<'TF'
variable "image" {
  type = string
}
variable "owner_name" {
  type = string
}
variable "note" {
  type    = string
  default = "n1"
}
resource "terraform_data" "workspace" {
  count            = 1
  triggers_replace = [var.image]
  input            = var.owner_name
}
resource "terraform_data" "home" {
  triggers_replace = { owner = var.owner_name }
}
resource "terraform_data" "updated_in_place" {
  input = var.note
}
resource "terraform_data" "untouched" {
  input = "constant"
}
output "agents" {
  value = ["main"]
}
TF
terraform init -input=false -no-color >/dev/null
TF_VAR_image=ubuntu TF_VAR_owner_name=prebuilds \
  terraform plan -input=false -no-color -out=create.tfplan >/dev/null
terraform show -json create.tfplan | python3 -m json.tool --indent 2 > "$here/plan-create.json"
terraform apply -input=false -no-color create.tfplan >/dev/null
TF_VAR_image=debian TF_VAR_owner_name=alice TF_VAR_note=n2 \
  terraform plan -input=false -no-color -out=replace.tfplan >/dev/null
terraform show -json replace.tfplan | python3 -m json.tool --indent 2 > "$here/plan-replace.json"
terraform version | head -1 > "$here/terraform-version.txt"
