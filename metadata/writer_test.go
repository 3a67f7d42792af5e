package metadata_test

import (
	"path/filepath"
	"testing"

	"github.com/lazycas/lazycas/metadata"
)

// TestWriterStoresWhatPutStores writes the fixture record by record, a
// link count after its node, and reads back what Put would have stored.
func TestWriterStoresWhatPutStores(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meta.db")
	db := open(t, path)
	defer db.Close()
	f := newFixture()
	w := db.NewWriter("sha256:layer")
	for _, n := range f.nodes {
		c := *n
		if c.ID == 2 {
			c.Nlink = 1 // the hard link comes later
		}
		if err := w.Node(&c); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range f.dirents {
		if err := w.Dirent(d); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Relink(2, 2); err != nil {
		t.Fatal(err)
	}
	// Not complete before Commit: a restart would drop it.
	if layers, err := db.Layers(); err != nil || len(layers) != 0 {
		t.Errorf("before Commit, Layers = %v, %v", layers, err)
	}
	if err := w.Commit(f.info); err != nil {
		t.Fatal(err)
	}
	l, err := db.Layer("sha256:layer")
	if err != nil {
		t.Fatal(err)
	}
	if !l.Info.Complete || l.Info.Nodes != len(f.nodes) {
		t.Errorf("info %+v", l.Info)
	}
	checkLayer(t, l, f)
	if err := w.Abort(); err != nil {
		t.Errorf("Abort after Commit: %v", err)
	}
	if _, err := db.Layer("sha256:layer"); err != nil {
		t.Errorf("Abort after Commit forgot the layer: %v", err)
	}
}

// TestWriterManyBatchesAndAbort: a layer of several transactions, then an
// aborted rewrite of it, which leaves nothing under the key.
func TestWriterManyBatchesAndAbort(t *testing.T) {
	db := open(t, filepath.Join(t.TempDir(), "meta.db"))
	defer db.Close()
	nodes, dirents := synthetic(45_678)
	w := db.NewWriter("big")
	for _, n := range nodes {
		if err := w.Node(n); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range dirents {
		if err := w.Dirent(d); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Commit(metadata.LayerInfo{}); err != nil {
		t.Fatal(err)
	}
	checkStored(t, db, "big", nodes, dirents)

	w = db.NewWriter("big")
	for _, n := range nodes {
		if err := w.Node(n); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Abort(); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Layer("big"); err == nil {
		t.Error("an aborted rewrite left a layer under the key")
	}
	if err := w.Commit(metadata.LayerInfo{}); err == nil {
		t.Error("Commit after Abort succeeded")
	}
}
