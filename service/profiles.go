package service

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/opencontainers/go-digest"

	"github.com/lazycas/lazycas/fs/profile"
)

// ProfileImport is the answer to an import.
type ProfileImport struct {
	Imported int `json:"imported"`
}

var errNoLearning = errors.New("start-up profiles are off (fs.learn = false)")

func (s *Service) profiles() *profile.DB {
	if s.lazy == nil {
		return nil
	}
	return s.lazy.prof
}

func (s *Service) handleProfileExport(w http.ResponseWriter, r *http.Request) {
	db := s.profiles()
	if db == nil {
		apiError(w, http.StatusNotFound, errNoLearning)
		return
	}
	var layers []digest.Digest
	for _, l := range r.URL.Query()["layer"] {
		d := digest.Digest(l)
		if err := d.Validate(); err != nil {
			apiError(w, http.StatusBadRequest, fmt.Errorf("layer %q: %w", l, err))
			return
		}
		layers = append(layers, d)
	}
	if s.lazy.learn != nil {
		if err := s.lazy.learn.Flush(r.Context()); err != nil {
			apiError(w, http.StatusInternalServerError, err)
			return
		}
	}
	e, err := db.Export(layers...)
	switch {
	case errors.Is(err, profile.ErrNoProfile):
		apiError(w, http.StatusNotFound, err)
	case err != nil:
		apiError(w, http.StatusInternalServerError, err)
	default:
		writeJSON(w, e)
	}
}

func (s *Service) handleProfileImport(w http.ResponseWriter, r *http.Request) {
	db := s.profiles()
	if db == nil {
		apiError(w, http.StatusNotFound, errNoLearning)
		return
	}
	n, err := db.Import(r.Body)
	switch {
	case errors.Is(err, profile.ErrInvalid):
		apiError(w, http.StatusBadRequest, err)
	case err != nil:
		apiError(w, http.StatusInternalServerError, err)
	default:
		writeJSON(w, ProfileImport{Imported: n})
	}
}
