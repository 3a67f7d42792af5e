package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"time"

	"github.com/containerd/log"
)

// API paths of the daemon's own HTTP API (on its own unix socket).
const (
	APIStats = "/v1/store/stats"
	APIGC    = "/v1/store/gc"
	// APIUnpacked lists recent layers unpacked rather than mounted lazily,
	// and why (GET).
	APIUnpacked = "/v1/layers/unpacked"
	// APIProfiles exports start-up profiles (GET, ?layer=DIGEST repeated;
	// none: all) and imports them (POST, the export as body).
	APIProfiles = "/v1/profiles"
)

// ServeAPI answers lazycas's own API on l until Shutdown: store statistics
// and garbage collection, as JSON, so that the CLI never opens the
// daemon's databases behind its back.
func (s *Service) ServeAPI(l net.Listener) error {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+APIStats, s.handleStats)
	mux.HandleFunc("POST "+APIGC, s.handleGC)
	mux.HandleFunc("GET "+APIUnpacked, func(w http.ResponseWriter, r *http.Request) { writeJSON(w, s.sn.Unpacked()) })
	mux.HandleFunc("GET "+APIProfiles, s.handleProfileExport)
	mux.HandleFunc("POST "+APIProfiles, s.handleProfileImport)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	s.api = srv
	if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("serve API on %s: %w", l.Addr(), err)
	}
	return nil
}

func (s *Service) handleStats(w http.ResponseWriter, r *http.Request) {
	if s.lazy == nil {
		apiError(w, http.StatusNotFound, errors.New("lazy layers are disabled (fs.lazy = false): there is no store"))
		return
	}
	st, err := s.lazy.fs.Stats(r.Context())
	if err != nil {
		apiError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, st)
}

func (s *Service) handleGC(w http.ResponseWriter, r *http.Request) {
	if s.lazy == nil {
		apiError(w, http.StatusNotFound, errors.New("lazy layers are disabled (fs.lazy = false): there is no store"))
		return
	}
	max, err := strconv.ParseInt(r.URL.Query().Get("max_bytes"), 10, 64)
	if err != nil || max < 0 {
		apiError(w, http.StatusBadRequest, fmt.Errorf("max_bytes: want a byte count, got %q", r.URL.Query().Get("max_bytes")))
		return
	}
	res, err := s.lazy.fs.GC(r.Context(), max)
	if err != nil {
		apiError(w, http.StatusInternalServerError, err)
		return
	}
	writeJSON(w, res)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.L.WithError(err).Debug("api: write response")
	}
}

// APIError is the body of a failed API call.
type APIError struct {
	Error string `json:"error"`
}

func apiError(w http.ResponseWriter, code int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(APIError{Error: err.Error()})
}

func (s *Service) shutdownAPI(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	for _, srv := range []*http.Server{s.api, s.metrics} {
		if srv != nil {
			if err := srv.Shutdown(ctx); err != nil {
				srv.Close()
			}
		}
	}
}
