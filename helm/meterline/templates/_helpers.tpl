{{/* Names and labels shared by every template. */}}

{{- define "meterline.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-<chart>`, or the release name alone when it already holds the chart name. */}}
{{- define "meterline.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meterline.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "meterline.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: meterline
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component; call with (dict "root" $ "component" "ingest"). */}}
{{- define "meterline.selectorLabels" -}}
app.kubernetes.io/name: {{ include "meterline.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meterline.componentLabels" -}}
{{ include "meterline.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "meterline.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "meterline.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a binary; call with (dict "root" $ "binary" "ingest"). */}}
{{- define "meterline.image" -}}
{{- printf "%s-%s:%s" .root.Values.image.repository .binary (default .root.Chart.AppVersion .root.Values.image.tag) }}
{{- end }}

{{/*
The four services: their binary, values key and whether the public Ingress and API peers
reach them. One list, so that Deployments, Services, PDBs and policies never disagree.
*/}}
{{- define "meterline.components" -}}
ingest:
  key: ingest
  public: true
aggregator:
  key: aggregator
  public: false
stripe-sink:
  key: stripeSink
  public: true
webhook-relay:
  key: webhookRelay
  public: true
{{- end }}

{{/* An env var from a Secret; call with (dict "name" "JWT_SECRET" "ref" .Values.auth.jwtSecret). */}}
{{- define "meterline.secretEnv" -}}
- name: {{ .name }}
  valueFrom:
    secretKeyRef:
      name: {{ required (printf "%s needs a Secret name (existingSecret)" .name) .ref.existingSecret }}
      key: {{ .ref.key }}
{{- end }}

{{/* The variables from Secrets each binary reads: DATABASE_URL everywhere, then its own. */}}
{{- define "meterline.secretEnvOf" -}}
{{- $v := .root.Values }}
{{- include "meterline.secretEnv" (dict "name" "DATABASE_URL" "ref" $v.postgresql.url) }}
{{- if $v.kafka.security.sasl.password.existingSecret }}
{{ include "meterline.secretEnv" (dict "name" "KAFKA_SASL_PASSWORD" "ref" $v.kafka.security.sasl.password) }}
{{- end }}
{{- with $v.postgresql.tls.sslMode }}
- name: PGSSLMODE
  value: {{ . | quote }}
{{- end }}
{{- with $v.postgresql.tls.caCertificate.existingSecret }}
- name: PGSSLROOTCERT
  value: /etc/meterline/postgres-ca/{{ $v.postgresql.tls.caCertificate.key }}
{{- end }}
{{- if has .binary (list "ingest" "stripe-sink") }}
{{ include "meterline.secretEnv" (dict "name" "JWT_SECRET" "ref" $v.auth.jwtSecret) }}
{{- end }}
{{- if has .binary (list "stripe-sink" "webhook-relay") }}
{{ include "meterline.secretEnv" (dict "name" "ENCRYPTION_KEYS" "ref" $v.encryption.keys) }}
{{- end }}
{{- if and (has .binary (list "ingest" "aggregator" "meterline")) $v.clickhouse.tls.caCertificate.existingSecret }}
- name: CLICKHOUSE_CA_CERT
  value: /etc/meterline/clickhouse-ca/{{ $v.clickhouse.tls.caCertificate.key }}
{{- end }}
{{- if and (has .binary (list "ingest" "aggregator" "meterline")) $v.clickhouse.password.existingSecret }}
{{ include "meterline.secretEnv" (dict "name" "CLICKHOUSE_PASSWORD" "ref" $v.clickhouse.password) }}
{{- end }}
{{- if and (eq .binary "webhook-relay") $v.stripe.webhookSecret.existingSecret }}
{{ include "meterline.secretEnv" (dict "name" "STRIPE_WEBHOOK_SECRET" "ref" $v.stripe.webhookSecret) }}
{{- end }}
{{- end }}

{{/* Kafka and ClickHouse settings (not secret), as a map of variables. */}}
{{- define "meterline.kafkaEnv" -}}
KAFKA_BROKERS: {{ join "," .Values.kafka.brokers | quote }}
TOPIC_PREFIX: {{ .Values.kafka.topicPrefix | quote }}
{{- with .Values.kafka.security }}
KAFKA_SECURITY_PROTOCOL: {{ .protocol | quote }}
{{- if .sasl.mechanism }}
KAFKA_SASL_MECHANISM: {{ .sasl.mechanism | quote }}
KAFKA_SASL_USERNAME: {{ .sasl.username | quote }}
{{- end }}
{{- with .tls.caCertificate }}
{{- if .existingSecret }}
KAFKA_SSL_CA_LOCATION: {{ printf "/etc/meterline/kafka-ca/%s" .key | quote }}
{{- end }}
{{- end }}
{{- with .tls.clientCertificate }}
{{- if .existingSecret }}
KAFKA_SSL_CERTIFICATE_LOCATION: {{ printf "/etc/meterline/kafka-client/%s" .certificateKey | quote }}
KAFKA_SSL_KEY_LOCATION: {{ printf "/etc/meterline/kafka-client/%s" .privateKeyKey | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- range $name, $value := .Values.kafka.properties }}
{{ printf "KAFKA_PROPERTY_%s" ($name | upper | replace "." "_") }}: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{- define "meterline.clickhouseEnv" -}}
CLICKHOUSE_URL: {{ .Values.clickhouse.url | quote }}
CLICKHOUSE_DATABASE: {{ .Values.clickhouse.database | quote }}
{{- with .Values.clickhouse.user }}
CLICKHOUSE_USER: {{ . | quote }}
{{- end }}
{{- with .Values.clickhouse.cluster }}
{{- if .name }}
CLICKHOUSE_CLUSTER: {{ .name | quote }}
CLICKHOUSE_CLUSTER_ENGINE: {{ .engine | quote }}
{{- if eq .engine "plain" }}
CLICKHOUSE_CLUSTER_NODES: {{ join "," .nodes | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* The non-secret variables of one service (its ConfigMap); call with (dict "root" $ "binary" "ingest"). */}}
{{- define "meterline.configOf" -}}
{{- $v := .root.Values }}
{{- $c := index $v (index (include "meterline.components" .root | fromYaml) .binary).key }}
HTTP_ADDR: {{ printf "0.0.0.0:%v" $c.port | quote }}
RUST_LOG: {{ $v.logLevel | quote }}
{{ include "meterline.kafkaEnv" .root }}
{{- if eq .binary "ingest" }}
{{ include "meterline.clickhouseEnv" .root }}
KAFKA_PRODUCE_TIMEOUT_MS: {{ $c.produceTimeoutMs | int64 | quote }}
INGEST_MAX_BODY_BYTES: {{ $c.maxBodyBytes | int64 | quote }}
INGEST_MAX_BULK_BODY_BYTES: {{ $c.maxBulkBodyBytes | int64 | quote }}
INGEST_MAX_BULK_EVENTS: {{ $c.maxBulkEvents | int64 | quote }}
INGEST_MAX_FUTURE_SECONDS: {{ $c.maxFutureSeconds | int64 | quote }}
{{- else if eq .binary "aggregator" }}
{{ include "meterline.clickhouseEnv" .root }}
STRIPE_SYNC_GRACE_PERIOD_MINUTES: {{ $v.stripe.syncGracePeriodMinutes | int64 | quote }}
AGGREGATOR_BATCH_MAX_EVENTS: {{ $c.batchMaxEvents | int64 | quote }}
AGGREGATOR_BATCH_MAX_WAIT_MS: {{ $c.batchMaxWaitMs | int64 | quote }}
AGGREGATOR_PUBLISH_INTERVAL_MS: {{ $c.publishIntervalMs | int64 | quote }}
AGGREGATOR_GROUP_ID: {{ $c.groupId | quote }}
{{- /* The aggregator prunes its own window registry. */}}
RETENTION_WINDOWS_DAYS: {{ $v.retention.windowsDays | int64 | quote }}
RETENTION_PRUNE_INTERVAL_SECONDS: {{ $v.retention.pruneIntervalSeconds | int64 | quote }}
{{- else if eq .binary "stripe-sink" }}
STRIPE_API_BASE: {{ $v.stripe.apiBase | quote }}
STRIPE_INTEGRATION_ENABLED: {{ $v.stripe.integrationEnabled | quote }}
STRIPE_API_TIMEOUT_SECONDS: {{ $v.stripe.apiTimeoutSeconds | int64 | quote }}
STRIPE_MAX_RETRIES: {{ $v.stripe.maxRetries | int64 | quote }}
{{- /* Window size changes are scheduled past the ingest's future allowance. */}}
INGEST_MAX_FUTURE_SECONDS: {{ $v.ingest.maxFutureSeconds | int64 | quote }}
{{- /* The sink prunes its own sync ledger. */}}
RETENTION_LEDGER_DAYS: {{ $v.retention.ledgerDays | int64 | quote }}
RETENTION_PRUNE_INTERVAL_SECONDS: {{ $v.retention.pruneIntervalSeconds | int64 | quote }}
{{- else if eq .binary "webhook-relay" }}
WEBHOOK_TOLERANCE_SECONDS: {{ $c.toleranceSeconds | int64 | quote }}
WEBHOOK_MAX_BODY_BYTES: {{ $c.maxBodyBytes | int64 | quote }}
KAFKA_PRODUCE_TIMEOUT_MS: {{ $c.produceTimeoutMs | int64 | quote }}
{{- with $c.allowedSources }}
WEBHOOK_ALLOWED_SOURCES: {{ join "," . | quote }}
{{- end }}
{{- with $c.trustedProxies }}
WEBHOOK_TRUSTED_PROXIES: {{ join "," . | quote }}
{{- end }}
{{- /* The relay prunes its own deduplication records. */}}
RETENTION_WEBHOOK_DELIVERIES_DAYS: {{ $v.retention.webhookDeliveriesDays | int64 | quote }}
RETENTION_PRUNE_INTERVAL_SECONDS: {{ $v.retention.pruneIntervalSeconds | int64 | quote }}
{{- end }}
{{- end }}

{{/* The CA certificates from Secrets (postgresql.tls.caCertificate, named by PGSSLROOTCERT;
clickhouse.tls.caCertificate, named by CLICKHOUSE_CA_CERT), read-only: the volume mounts and
their volumes, each empty when no Secret is given. */}}
{{- define "meterline.caMounts" -}}
{{- if .Values.postgresql.tls.caCertificate.existingSecret }}
- name: postgres-ca
  mountPath: /etc/meterline/postgres-ca
  readOnly: true
{{- end }}
{{- if .Values.clickhouse.tls.caCertificate.existingSecret }}
- name: clickhouse-ca
  mountPath: /etc/meterline/clickhouse-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.security.tls.caCertificate.existingSecret }}
- name: kafka-ca
  mountPath: /etc/meterline/kafka-ca
  readOnly: true
{{- end }}
{{- if .Values.kafka.security.tls.clientCertificate.existingSecret }}
- name: kafka-client
  mountPath: /etc/meterline/kafka-client
  readOnly: true
{{- end }}
{{- end }}

{{- define "meterline.caVolumes" -}}
{{- range $name, $ca := dict "postgres-ca" .Values.postgresql.tls.caCertificate "clickhouse-ca" .Values.clickhouse.tls.caCertificate "kafka-ca" .Values.kafka.security.tls.caCertificate }}
{{- if $ca.existingSecret }}
- name: {{ $name }}
  secret:
    secretName: {{ $ca.existingSecret }}
    items:
      - key: {{ $ca.key }}
        path: {{ $ca.key }}
{{- end }}
{{- end }}
{{- with .Values.kafka.security.tls.clientCertificate }}
{{- if .existingSecret }}
- name: kafka-client
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 0400
    items:
      - key: {{ .certificateKey }}
        path: {{ .certificateKey }}
      - key: {{ .privateKeyKey }}
        path: {{ .privateKeyKey }}
{{- end }}
{{- end }}
{{- end }}
