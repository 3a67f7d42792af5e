package service

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/lazycas/lazycas/service/cri"
)

var (
	descCRIPulls     = desc("cri_pulls_total", "Image pulls kubelet made through lazycas's CRI image service.")
	descCRIPullErrs  = desc("cri_pull_errors_total", "Of those, pulls containerd failed.")
	descCRIWithCreds = desc("cri_pulls_with_credentials_total", "Pulls whose credentials lazycas kept (in memory) for lazy reads.")
	descCRIRepos     = desc("cri_credential_repositories", "Repositories with unexpired credentials from kubelet's pulls.")
)

// criCollector reads the CRI image service's counters at each scrape.
type criCollector struct{ p *cri.Proxy }

func (c criCollector) Describe(ch chan<- *prometheus.Desc) { prometheus.DescribeByCollect(c, ch) }

func (c criCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.p.Stats()
	ch <- prometheus.MustNewConstMetric(descCRIPulls, prometheus.CounterValue, float64(st.Pulls))
	ch <- prometheus.MustNewConstMetric(descCRIPullErrs, prometheus.CounterValue, float64(st.PullErrors))
	ch <- prometheus.MustNewConstMetric(descCRIWithCreds, prometheus.CounterValue, float64(st.WithCredentials))
	ch <- prometheus.MustNewConstMetric(descCRIRepos, prometheus.GaugeValue, float64(st.Repositories))
}
