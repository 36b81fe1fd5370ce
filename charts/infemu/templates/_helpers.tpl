{{/* Names and labels shared by every template. */}}

{{- define "infemu.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "infemu.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "infemu.labels" -}}
{{ include "infemu.selectorLabels" . }}
app.kubernetes.io/part-of: infemu
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "infemu.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "infemu.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "infemu.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* "true" when PrometheusRule/ServiceMonitor should be rendered */}}
{{- define "infemu.prometheusOperator" -}}
{{- $mode := .Values.monitoring.prometheusOperator -}}
{{- if eq $mode "auto" -}}
{{- .Capabilities.APIVersions.Has "monitoring.coreos.com/v1" -}}
{{- else -}}
{{- eq $mode "enabled" -}}
{{- end -}}
{{- end -}}

{{/* The operator's permissions: the same rules for a ClusterRole or for each namespaced Role. */}}
{{- define "infemu.rbacRules" -}}
- apiGroups: ["infemu.io"]
  resources: ["inferenceclusters", "loadtests", "faults"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["infemu.io"]
  resources: ["inferenceclusters/status", "loadtests/status", "faults/status"]
  verbs: ["get", "patch"]
- apiGroups: ["apps"]
  resources: ["statefulsets", "deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# delete: a chaos kill (a Fault or a LoadTest's spec.faults) deletes the pod; its StatefulSet restarts it
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "delete"]
- apiGroups: ["", "events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
# the optional InferencePool of spec.gateway.inferencePool (Gateway API Inference Extension)
- apiGroups: ["inference.networking.k8s.io"]
  resources: ["inferencepools"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end -}}
