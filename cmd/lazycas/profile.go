package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"

	"github.com/lazycas/lazycas/config"
	"github.com/lazycas/lazycas/fs/profile"
	"github.com/lazycas/lazycas/service"
)

// layerFlags collects repeated --layer flags.
type layerFlags []string

func (l *layerFlags) String() string     { return fmt.Sprint(*l) }
func (l *layerFlags) Set(v string) error { *l = append(*l, v); return nil }

func imageProfile(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "export":
			return profileExport(ctx, args[1:], stdout, stderr)
		case "import":
			return profileImport(ctx, args[1:], stdout, stderr)
		case "push":
			return profilePush(ctx, args[1:], stdout, stderr)
		case "pull":
			return profilePull(ctx, args[1:], stdout, stderr)
		}
	}
	fmt.Fprintln(stderr, "usage: lazycas image profile export [--layer DIGEST ...] FILE | import FILE | push REF | pull REF")
	return errUsage
}

func profileExport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas image profile export", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas image profile export [--layer DIGEST ...] FILE (- for stdout)")
		flags.PrintDefaults()
	}
	var layers layerFlags
	address := flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket")
	flags.Var(&layers, "layer", "export this layer's profile (repeat; default: every profile)")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		flags.Usage()
		return errUsage
	}
	var e profile.Export
	q := url.Values{"layer": layers}
	if err := newAPIClient(*address).call(ctx, http.MethodGet, service.APIProfiles, q, &e); err != nil {
		return err
	}
	data, err := json.MarshalIndent(e, "", "  ")
	if err != nil {
		return err
	}
	data = append(data, '\n')
	if out := flags.Arg(0); out != "-" {
		if err := writeFileAtomic(out, data); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "exported %d profiles to %s\n", len(e.Profiles), out)
		return nil
	}
	_, err = stdout.Write(data)
	return err
}

// writeFileAtomic writes data under a temporary name and renames it into
// place: an interrupted export leaves no half file.
func writeFileAtomic(name string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(name), "."+filepath.Base(name)+".*")
	if err != nil {
		return fmt.Errorf("export: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("export: %w", err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	if err := os.Rename(f.Name(), name); err != nil {
		return fmt.Errorf("export: %w", err)
	}
	return nil
}

func profileImport(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	flags := flag.NewFlagSet("lazycas image profile import", flag.ContinueOnError)
	flags.SetOutput(stderr)
	flags.Usage = func() {
		fmt.Fprintln(stderr, "usage: lazycas image profile import FILE")
		flags.PrintDefaults()
	}
	address := flags.String("api-address", config.DefaultAPIAddress, "the lazycas daemon's API socket")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if flags.NArg() != 1 {
		flags.Usage()
		return errUsage
	}
	data, err := os.ReadFile(flags.Arg(0))
	if err != nil {
		return fmt.Errorf("import: %w", err)
	}
	// Checked here too, for an error naming the file before any request.
	var e profile.Export
	if err := json.Unmarshal(data, &e); err != nil {
		return fmt.Errorf("import %s: %w: %w", flags.Arg(0), profile.ErrInvalid, err)
	}
	if err := e.Validate(); err != nil {
		return fmt.Errorf("import %s: %w", flags.Arg(0), err)
	}
	var res service.ProfileImport
	c := newAPIClient(*address)
	if err := c.send(ctx, http.MethodPost, service.APIProfiles, data, &res); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "imported %d profiles\n", res.Imported)
	return nil
}

// send posts body to the daemon and decodes the JSON answer into out.
func (c *apiClient) send(ctx context.Context, method, path string, body []byte, out any) error {
	u := url.URL{Scheme: "http", Host: "lazycas", Path: path}
	req, err := http.NewRequestWithContext(ctx, method, u.String(), bytes.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return c.unreachable(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		var e service.APIError
		if json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&e) == nil && e.Error != "" {
			return fmt.Errorf("lazycas daemon: %s", e.Error)
		}
		return fmt.Errorf("lazycas daemon: %s", resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(out)
}
