# A template the terraform provisioner backend can run anywhere: only the built-in
# terraform_data resource, no provider downloads.
variable "workspace_name" { type = string }
variable "owner_name" { type = string }
variable "cpus" {
  type    = string
  default = "2"
}
variable "region" {
  type    = string
  default = "eu"
}

resource "terraform_data" "workspace" {
  # Changing the size replaces the workspace: exactly the drift prebuild claims report.
  triggers_replace = [var.cpus, var.region]
  input = {
    name  = var.workspace_name
    owner = var.owner_name
  }
}
