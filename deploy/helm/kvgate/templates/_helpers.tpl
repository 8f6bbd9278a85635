{{- define "kvgate.name" -}}{{ .Release.Name }}-kvgate{{- end -}}

{{- define "kvgate.labels" -}}
app.kubernetes.io/name: kvgate
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "kvgate.selector" -}}
app.kubernetes.io/name: kvgate
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "kvgate.keySecret" -}}
{{- if .Values.contracts.existingSecret -}}{{ .Values.contracts.existingSecret }}{{- else -}}{{ include "kvgate.name" . }}-keys{{- end -}}
{{- end -}}

{{- define "kvgate.securityContext" -}}
runAsNonRoot: true
runAsUser: 65532
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: [ALL]
{{- end -}}

{{- /* The contracts section both the gateway and the store read. */ -}}
{{- define "kvgate.contracts" -}}
master_key: {file: /run/secrets/kvgate/master.key}
contracts: {{ toJson .Values.contracts.contracts }}
api_keys: {{ toJson .Values.contracts.apiKeys }}
{{- end -}}
