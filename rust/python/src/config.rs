//! The configuration sections as Python classes (`Routing`, `Prefetch`,
//! `Cache`, `Chaos`, `Replica`), and the conversion of Python values into the core's
//! configuration tree and of core figures back into Python objects. Every
//! check lives in `feedline_core::config`; this module only converts.

use feedline_core::chaos::ChaosSpec;
use feedline_core::config::{self, CacheOptions, PrefetchOptions, ReplicaSpec, StorageConfig};
use feedline_core::route::RoutingOptions;
use pyo3::exceptions::{PyAttributeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyDict, PyFloat, PyInt, PyList, PyMapping, PyString, PyTuple};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::errors::IntoPyResult;

/// A Python value as a configuration tree. `name` is the option it was
/// given as, for errors. Objects with `to_dict()` (the section classes, the
/// chaos latency distributions) convert through it.
pub fn to_value(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<Value> {
    if obj.is_none() {
        return Ok(Value::Null);
    }
    if let Ok(b) = obj.cast::<PyBool>() {
        return Ok(Value::Bool(b.is_true()));
    }
    if obj.is_instance_of::<PyInt>() {
        if let Ok(i) = obj.extract::<i64>() {
            return Ok(Value::from(i));
        }
        if let Ok(u) = obj.extract::<u64>() {
            return Ok(Value::from(u));
        }
        return Err(PyValueError::new_err(format!(
            "{name} is out of range: {obj}"
        )));
    }
    if let Ok(f) = obj.cast::<PyFloat>() {
        let v = f.value();
        return Number::from_f64(v).map(Value::Number).ok_or_else(|| {
            PyValueError::new_err(format!(
                "{name} must be a finite number, got {}",
                describe(obj)
            ))
        });
    }
    if let Ok(s) = obj.cast::<PyString>() {
        return Ok(Value::String(s.to_str()?.to_owned()));
    }
    if obj.hasattr("__fspath__")? {
        let path = obj.py().import("os")?.call_method1("fspath", (obj,))?;
        return to_value(&path, name);
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        return obj
            .try_iter()?
            .enumerate()
            .map(|(i, item)| to_value(&item?, &format!("{name}[{i}]")))
            .collect::<PyResult<Vec<_>>>()
            .map(Value::Array);
    }
    if let Ok(mapping) = obj.cast::<PyMapping>() {
        let mut map = Map::new();
        for item in mapping.items()?.iter() {
            let (k, v): (Bound<'_, PyAny>, Bound<'_, PyAny>) = item.extract()?;
            let key = match k.cast::<PyString>() {
                Ok(s) => s.to_str()?.to_owned(),
                Err(_) if k.is_instance_of::<PyInt>() && !k.is_instance_of::<PyBool>() => {
                    k.str()?.to_str()?.to_owned()
                }
                Err(_) => {
                    return Err(PyTypeError::new_err(format!(
                        "{name} keys must be str, got {}",
                        describe(&k)
                    )))
                }
            };
            let value = to_value(&v, &key)?;
            map.insert(key, value);
        }
        return Ok(Value::Object(map));
    }
    if obj.hasattr("to_dict")? {
        return to_value(&obj.call_method0("to_dict")?, name);
    }
    Err(PyTypeError::new_err(format!(
        "{name} has a value of unsupported type {}: {}",
        obj.get_type().name()?,
        describe(obj)
    )))
}

/// A configuration tree (or any serializable core figure) as plain Python
/// objects: dicts, lists, str, int, float, bool, None.
pub fn to_py<'py>(py: Python<'py>, v: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match v {
        Value::Null => py.None().into_bound(py),
        Value::Bool(b) => PyBool::new(py, *b).to_owned().into_any(),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u.into_pyobject(py)?.into_any(),
            (None, Some(i)) => i.into_pyobject(py)?.into_any(),
            _ => n.as_f64().unwrap_or(f64::NAN).into_pyobject(py)?.into_any(),
        },
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array(items) => {
            let list = PyList::empty(py);
            for item in items {
                list.append(to_py(py, item)?)?;
            }
            list.into_any()
        }
        Value::Object(map) => {
            let dict = PyDict::new(py);
            for (k, item) in map {
                dict.set_item(k, to_py(py, item)?)?;
            }
            dict.into_any()
        }
    })
}

/// A serializable core value as Python objects.
pub fn serialized<'py, T: Serialize>(py: Python<'py>, value: &T) -> PyResult<Bound<'py, PyAny>> {
    let tree = serde_json::to_value(value)
        .map_err(|e| PyValueError::new_err(format!("cannot convert: {e}")))?;
    to_py(py, &tree)
}

fn describe(obj: &Bound<'_, PyAny>) -> String {
    obj.repr()
        .map(|r| r.to_string())
        .unwrap_or_else(|_| "an unprintable object".into())
}

/// Keyword arguments as a tree.
pub fn kwargs_value(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<Value> {
    match kwargs {
        Some(d) => to_value(d.as_any(), "options"),
        None => Ok(Value::Object(Map::new())),
    }
}

/// One section from its options; `check` runs the checks that need the
/// whole section (ranges, values against each other).
fn build<T: DeserializeOwned>(
    name: &str,
    value: Value,
    check: impl Fn(&T) -> feedline_core::Result<()>,
) -> PyResult<T> {
    let section: T = config::section(name, value).py()?;
    check(&section).py()?;
    Ok(section)
}

/// `Name(a=1, b='x')`, listing only options that differ from the defaults.
fn repr_of<T: Serialize + Default>(class: &str, value: &T) -> String {
    let (Ok(Value::Object(now)), Ok(Value::Object(base))) = (
        serde_json::to_value(value),
        serde_json::to_value(T::default()),
    ) else {
        return format!("{class}(...)");
    };
    let shown: Vec<String> = now
        .iter()
        .filter(|(k, v)| base.get(*k) != Some(v))
        .map(|(k, v)| format!("{k}={}", config::py_repr(v)))
        .collect();
    format!("{class}({})", shown.join(", "))
}

/// The frozen Python class of one configuration section: built from
/// keyword arguments, checked at construction, read back as attributes or
/// with `to_dict()`, copied with changes by `replace(...)`, pickled by value.
macro_rules! section_class {
    ($rust:ident, $py_name:literal, $section:literal, $core:ty, $check:expr) => {
        #[pyclass(name = $py_name, module = "feedline._core", frozen)]
        #[derive(Clone)]
        pub struct $rust {
            pub inner: $core,
        }

        impl $rust {
            pub fn from_value(value: Value) -> PyResult<Self> {
                Ok($rust {
                    inner: build($section, value, $check)?,
                })
            }
        }

        #[pymethods]
        impl $rust {
            #[new]
            #[pyo3(signature = (**options))]
            fn new(options: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                Self::from_value(kwargs_value(options)?)
            }

            /// Every option, defaults included, as plain Python values.
            fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
                serialized(py, &self.inner)
            }

            /// A copy with the given options changed.
            #[pyo3(signature = (**changes))]
            fn replace(&self, changes: Option<&Bound<'_, PyDict>>) -> PyResult<Self> {
                let mut tree = serde_json::to_value(&self.inner)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                if let (Value::Object(base), Value::Object(over)) =
                    (&mut tree, kwargs_value(changes)?)
                {
                    base.extend(over);
                }
                Self::from_value(tree)
            }

            /// The option names of this section, in order.
            #[classattr]
            fn options() -> Vec<&'static str> {
                config::section_fields($section).to_vec()
            }

            fn __getattr__<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
                let tree = serde_json::to_value(&self.inner)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                match tree.get(name) {
                    Some(v) => to_py(py, v),
                    None => Err(PyAttributeError::new_err(format!(
                        "{} has no option '{name}'",
                        $py_name
                    ))),
                }
            }

            fn __repr__(&self) -> String {
                repr_of($py_name, &self.inner)
            }

            fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
                other
                    .cast::<$rust>()
                    .is_ok_and(|o| o.get().inner == self.inner)
            }

            fn __hash__(&self) -> PyResult<isize> {
                Err(PyTypeError::new_err(concat!(
                    "unhashable type: '",
                    $py_name,
                    "'"
                )))
            }

            fn __reduce__<'py>(
                slf: &Bound<'py, Self>,
                py: Python<'py>,
            ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>,))> {
                let rebuild = py.import("feedline._core")?.getattr("rebuild_section")?;
                let args = PyTuple::new(
                    py,
                    [
                        PyString::new(py, $py_name).into_any(),
                        slf.get().to_dict(py)?,
                    ],
                )?;
                Ok((rebuild, (args.into_any(),)))
            }
        }
    };
}

section_class!(
    PyRouting,
    "Routing",
    "routing",
    RoutingOptions,
    |o: &RoutingOptions| { feedline_core::route::RouterConfig::from_options(o).map(|_| ()) }
);
section_class!(
    PyPrefetch,
    "Prefetch",
    "prefetch",
    PrefetchOptions,
    |o: &PrefetchOptions| { o.stream_config().map(|_| ()) }
);
section_class!(PyCache, "Cache", "cache", CacheOptions, CacheOptions::check);
section_class!(PyChaos, "Chaos", "chaos", ChaosSpec, ChaosSpec::validate);

/// One replica: a path or URL, its own storage options, its weight.
#[pyclass(name = "Replica", module = "feedline._core", frozen)]
#[derive(Clone)]
pub struct PyReplica {
    pub inner: ReplicaSpec,
}

#[pymethods]
impl PyReplica {
    #[new]
    #[pyo3(signature = (url, *, storage_options = None, weight = None))]
    fn new(
        url: &Bound<'_, PyAny>,
        storage_options: Option<&Bound<'_, PyAny>>,
        weight: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let mut table = Map::new();
        table.insert("url".into(), to_value(url, "url")?);
        if let Some(o) = storage_options {
            table.insert("storage_options".into(), to_value(o, "storage_options")?);
        }
        if let Some(w) = weight {
            table.insert("weight".into(), to_value(w, "weight")?);
        }
        let inner: ReplicaSpec = config::section("replica", Value::Object(table)).py()?;
        if let Some(w) = inner.weight.filter(|w| !(w.is_finite() && *w > 0.0)) {
            return Err(PyValueError::new_err(format!(
                "weight must be a finite number above 0, got {w}"
            )));
        }
        Ok(PyReplica { inner })
    }

    #[getter]
    fn url(&self) -> &str {
        &self.inner.url
    }

    #[getter]
    fn weight(&self) -> Option<f64> {
        self.inner.weight
    }

    /// The replica's own options, unredacted (they are the caller's).
    #[getter]
    fn storage_options<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        to_py(
            py,
            &Value::Object(self.inner.storage_options.clone().into_iter().collect()),
        )
    }

    /// The table the core reads: `{url, storage_options, weight}`.
    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        d.set_item("url", &self.inner.url)?;
        d.set_item("storage_options", self.storage_options(py)?)?;
        d.set_item("weight", self.inner.weight)?;
        Ok(d)
    }

    fn __repr__(&self) -> String {
        let shown = serde_json::to_value(&self.inner).unwrap_or(Value::Null);
        let url = shown.get("url").map(config::py_repr).unwrap_or_default();
        match self.inner.weight {
            Some(w) => format!("Replica({url}, weight={w})"),
            None => format!("Replica({url})"),
        }
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyReplica>()
            .is_ok_and(|o| o.get().inner == self.inner)
    }

    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyAny>,))> {
        let rebuild = py.import("feedline._core")?.getattr("rebuild_section")?;
        let args = PyTuple::new(
            py,
            [
                PyString::new(py, "Replica").into_any(),
                self.to_dict(py)?.into_any(),
            ],
        )?;
        Ok((rebuild, (args.into_any(),)))
    }
}

/// Rebuilds a pickled section: `rebuild_section((class_name, options))`.
#[pyfunction]
fn rebuild_section<'py>(
    py: Python<'py>,
    state: (String, Bound<'py, PyAny>),
) -> PyResult<Bound<'py, PyAny>> {
    let (class, options) = state;
    let value = to_value(&options, &class)?;
    Ok(match class.as_str() {
        "Routing" => Bound::new(py, PyRouting::from_value(value)?)?.into_any(),
        "Prefetch" => Bound::new(py, PyPrefetch::from_value(value)?)?.into_any(),
        "Cache" => Bound::new(py, PyCache::from_value(value)?)?.into_any(),
        "Chaos" => Bound::new(py, PyChaos::from_value(value)?)?.into_any(),
        "Replica" => Bound::new(
            py,
            PyReplica {
                inner: config::section("replica", value).py()?,
            },
        )?
        .into_any(),
        other => return Err(PyValueError::new_err(format!("unknown section {other:?}"))),
    })
}

/// Checks FileSystem options (flat or in sections) without opening
/// anything; returns the configuration they make, defaults filled in.
#[pyfunction]
#[pyo3(signature = (options = None))]
fn check_options<'py>(
    py: Python<'py>,
    options: Option<&Bound<'py, PyDict>>,
) -> PyResult<Bound<'py, PyAny>> {
    let config = StorageConfig::from_value(kwargs_value(options)?).py()?;
    serialized(py, &config)
}

/// Every option name `FileSystem` takes (top level and flat section
/// options): what Python may pass on, and what a typo is compared against.
#[pyfunction]
fn option_names() -> Vec<&'static str> {
    config::all_option_names()
}

/// The known name nearest to `name` (a likely typo), if any.
#[pyfunction]
fn nearest_option(name: &str, known: Vec<String>) -> Option<String> {
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    config::nearest(name, &known).map(str::to_owned)
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyRouting>()?;
    m.add_class::<PyPrefetch>()?;
    m.add_class::<PyCache>()?;
    m.add_class::<PyChaos>()?;
    m.add_class::<PyReplica>()?;
    m.add_function(wrap_pyfunction!(rebuild_section, m)?)?;
    m.add_function(wrap_pyfunction!(option_names, m)?)?;
    m.add_function(wrap_pyfunction!(check_options, m)?)?;
    m.add_function(wrap_pyfunction!(nearest_option, m)?)?;
    Ok(())
}
